"""choose(): which campaign a message goes to, and the reason given."""

from __future__ import annotations

from services.router.filters import DEFAULT_REASON, choose
from services.router.parsing import ParsedEmail, parse_email
from shared.catalog import Filter
from shared.models import MatchField, RouteDecision

DEFAULT = 99


def message(
    subject: str = "Where is my refund?",
    sender: str = "Jane Doe <jane@customer.example>",
    body: str = "Hello,\r\nI paid twice for order 1234.\r\n",
    content_type: str = "text/plain; charset=utf-8",
) -> ParsedEmail:
    raw = (
        f"From: {sender}\r\nSubject: {subject}\r\nMessage-ID: <m@x>\r\n"
        f"Content-Type: {content_type}\r\n\r\n{body}"
    ).encode()
    return parse_email(raw, attachment_limit=1024)


def rule(
    id: int,
    field: str,
    value: str,
    campaign: int,
    operator: str = "contains",
    stop: bool = True,
    position: int | None = None,
) -> Filter:
    return Filter(
        id=id,
        channel_id=1,
        position=id if position is None else position,
        field=MatchField(field),
        operator=operator,
        value=value,
        campaign_id=campaign,
        stop=stop,
    )


def test_no_filters_give_the_default_campaign() -> None:
    result = choose((), message(), DEFAULT)

    assert (DEFAULT, RouteDecision(reason=DEFAULT_REASON)) == result


def test_contains_ignores_case() -> None:
    filters = (rule(3, "subject", "REFUND", 10),)

    result = choose(filters, message(), DEFAULT)

    expected = RouteDecision(
        filter_id=3,
        field=MatchField.SUBJECT,
        value="REFUND",
        reason="filter 3: subject contains 'REFUND'",
    )
    assert (10, expected) == result


def test_contains_folds_case_beyond_ascii() -> None:
    filters = (rule(1, "subject", "STRASSE", 10),)

    campaign, _ = choose(filters, message(subject="Hauptstraße 5"), DEFAULT)

    assert 10 == campaign


def test_not_contains_matches_when_the_text_is_absent() -> None:
    filters = (
        rule(1, "body", "invoice", 10, operator="not_contains"),
        rule(2, "body", "ORDER", 20, operator="not_contains"),
    )

    campaign, decision = choose(filters, message(), DEFAULT)

    assert (10, "filter 1: body does not contain 'invoice'") == (
        campaign,
        decision.reason,
    )


def test_sender_filters_see_display_name_and_address() -> None:
    filters = (
        rule(1, "sender", "@vip.example", 10),
        rule(2, "sender", "jane doe", 20),
    )

    campaign, decision = choose(filters, message(), DEFAULT)

    assert (20, 2) == (campaign, decision.filter_id)


def test_body_filters_see_text_of_an_html_only_message() -> None:
    html = "<p>Please <b>cancel</b>&nbsp;my subscription</p>"
    parsed = message(body=html, content_type="text/html")
    filters = (rule(1, "body", "cancel my subscription", 10),)

    campaign, _ = choose(filters, parsed, DEFAULT)

    assert 10 == campaign


def test_regex_ignores_case_and_quotes_what_it_matched() -> None:
    filters = (rule(5, "body", r"order\s+(\d+)", 10, operator="regex"),)

    campaign, decision = choose(filters, message(), DEFAULT)

    expected = "filter 5: body matches 'order\\\\s+(\\\\d+)' at 'order 1234'"
    assert (10, expected) == (campaign, decision.reason)


def test_filters_run_in_position_order_whatever_the_input_order() -> None:
    filters = [
        rule(1, "subject", "refund", 10, position=2),
        rule(2, "body", "order", 20, position=1),
    ]

    campaign, decision = choose(filters, message(), DEFAULT)

    assert (20, 2) == (campaign, decision.filter_id)


def test_with_stop_the_first_match_wins() -> None:
    filters = (rule(1, "subject", "refund", 10), rule(2, "body", "order", 20))

    campaign, _ = choose(filters, message(), DEFAULT)

    assert 10 == campaign


def test_without_stop_a_later_match_overrides() -> None:
    filters = (
        rule(1, "subject", "refund", 10, stop=False),
        rule(2, "body", "order", 20, stop=False),
        rule(3, "body", "nothing like this", 30, stop=False),
    )

    campaign, decision = choose(filters, message(), DEFAULT)

    assert (20, "filter 2: body contains 'order'") == (campaign, decision.reason)


def test_a_later_stop_ends_the_overrides() -> None:
    filters = (
        rule(1, "subject", "refund", 10, stop=False),
        rule(2, "body", "order", 20, stop=True),
        rule(3, "body", "paid", 30, stop=False),
    )

    campaign, _ = choose(filters, message(), DEFAULT)

    assert 20 == campaign


def test_invalid_regex_counts_as_no_match_and_is_explained() -> None:
    filters = (
        rule(1, "subject", "([unclosed", 10, operator="regex"),
        rule(2, "subject", "refund", 20),
    )

    campaign, decision = choose(filters, message(), DEFAULT)

    assert 20 == campaign
    assert decision.reason.startswith(
        "filter 2: subject contains 'refund'; filter 1: invalid regex '([unclosed'"
    )
    assert decision.reason.endswith("; counted as no match")


def test_regex_running_too_long_counts_as_no_match() -> None:
    filters = (rule(7, "body", r"(a|aa)+$", 10, operator="regex"),)
    parsed = message(body="a" * 60 + "b")

    campaign, decision = choose(filters, parsed, DEFAULT)

    expected = (
        f"{DEFAULT_REASON}; filter 7: regex '(a|aa)+$' took over 50 ms on the body; "
        "counted as no match"
    )
    assert (DEFAULT, expected) == (campaign, decision.reason)


def test_long_values_are_shortened_in_the_reason() -> None:
    value = "refund" + "x" * 200
    filters = (rule(1, "subject", value, 10, operator="not_contains"),)

    _, decision = choose(filters, message(), DEFAULT)

    assert len(decision.reason) < 120
    assert value == decision.value


def test_changed_filter_list_is_not_answered_from_the_cache() -> None:
    filters = [rule(1, "subject", "refund", 10)]
    choose(filters, message(), DEFAULT)
    filters[0] = rule(1, "subject", "refund", 20)

    campaign, _ = choose(filters, message(), DEFAULT)

    assert 20 == campaign


def test_same_tuple_gives_the_same_decision_each_time() -> None:
    misses = [rule(i, "body", f"word{i}", i) for i in range(1, 50)]
    filters = (*misses, rule(50, "body", "paid twice", 50))

    results = {choose(filters, message(), DEFAULT) for _ in range(3)}

    assert 1 == len(results)
    assert 50 == results.pop()[0]
