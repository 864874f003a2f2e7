"""Choosing a message's campaign from its channel's filters.

Filters run in position order. One matches when its field (sender, subject or
body) contains its value, does not contain it, or matches it as a regular
expression, all ignoring case. A match sets the campaign; a filter with
``stop`` ends the evaluation there, one without lets later matches override
it. A regular expression that is invalid or runs past its time budget counts
as no match, and the decision says so rather than the router failing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import regex

from services.router.parsing import ParsedEmail
from shared.catalog import Filter
from shared.models import MatchField, RouteDecision

REGEX_TIMEOUT_SECONDS = 0.05
DEFAULT_REASON = "no filter matched; default campaign"

_REGEX_FLAGS = regex.IGNORECASE | regex.FULLCASE
_QUOTE_LIMIT = 80
_PREPARED_LIMIT = 1024


@dataclass(frozen=True)
class _Rule:
    """A filter ready to test: value case-folded or compiled, phrases written."""

    filter: Filter
    field: MatchField
    operator: str
    needle: str
    pattern: regex.Pattern[str] | None
    # What the decision says when the filter matches, or why it cannot.
    phrase: str


class _Fields:
    """A message's match texts, case-folded only when a filter asks for one."""

    def __init__(self, parsed: ParsedEmail) -> None:
        self.texts = {
            MatchField.SENDER: parsed.sender_text,
            MatchField.SUBJECT: parsed.headers.subject,
            MatchField.BODY: parsed.body_text,
        }
        self.folded: dict[MatchField, str] = {}

    def folded_text(self, field: MatchField) -> str:
        folded = self.folded.get(field)
        if folded is None:
            folded = self.folded[field] = self.texts[field].casefold()
        return folded


# Prepared rules by id() of a filter tuple; the tuple is kept alongside so
# that its id cannot be reused by another object while the entry exists.
_prepared: dict[int, tuple[tuple[Filter, ...], tuple[_Rule, ...]]] = {}


def choose(
    filters: Sequence[Filter], parsed: ParsedEmail, default_campaign_id: int
) -> tuple[int, RouteDecision]:
    """The campaign for a message, and the decision explaining it."""
    fields = _Fields(parsed)
    problems: list[str] = []
    chosen: tuple[_Rule, str] | None = None
    for rule in _rules(filters):
        found = _test(rule, fields, problems)
        if found is None:
            continue

        chosen = (rule, found)
        if rule.filter.stop:
            break

    if chosen is None:
        reason = "; ".join([DEFAULT_REASON, *problems])
        return default_campaign_id, RouteDecision(reason=reason)

    rule, found = chosen
    reason = "; ".join([f"filter {rule.filter.id}: {found}", *problems])
    decision = RouteDecision(
        filter_id=rule.filter.id,
        field=rule.filter.field,
        value=rule.filter.value,
        reason=reason,
    )
    return rule.filter.campaign_id, decision


def _test(rule: _Rule, fields: _Fields, problems: list[str]) -> str | None:
    """What matched, as a phrase for the decision; None when nothing did."""
    if rule.operator == "contains":
        return rule.phrase if rule.needle in fields.folded_text(rule.field) else None
    if rule.operator == "not_contains":
        return None if rule.needle in fields.folded_text(rule.field) else rule.phrase

    item = rule.filter
    if rule.pattern is None:
        problems.append(f"filter {item.id}: {rule.phrase}; counted as no match")
        return None
    try:
        match = rule.pattern.search(
            fields.texts[rule.field], timeout=REGEX_TIMEOUT_SECONDS
        )
    except TimeoutError:
        problems.append(
            f"filter {item.id}: regex {_quote(item.value)} took over "
            f"{REGEX_TIMEOUT_SECONDS * 1000:.0f} ms on the {rule.field.value}; "
            "counted as no match"
        )
        return None
    if match is None:
        return None
    return f"{rule.phrase} at {_quote(match.group())}"


def _rules(filters: Sequence[Filter]) -> tuple[_Rule, ...]:
    """Rules in position order, prepared once per filter tuple.

    The routing table hands over the same tuple for every message of a
    channel, so its identity is the cache key; other sequences (a list may
    change under us) are prepared afresh, which is cheap because compiled
    patterns are cached by value.
    """
    if not isinstance(filters, tuple):
        return _prepare(filters)

    entry = _prepared.get(id(filters))
    if entry is not None and entry[0] is filters:
        return entry[1]

    rules = _prepare(filters)
    if len(_prepared) >= _PREPARED_LIMIT:
        _prepared.clear()
    _prepared[id(filters)] = (filters, rules)
    return rules


def _prepare(filters: Sequence[Filter]) -> tuple[_Rule, ...]:
    ordered = sorted(filters, key=lambda f: (f.position, f.id))
    rules = []
    for item in ordered:
        field = MatchField(item.field)
        value = _quote(item.value)
        if item.operator == "regex":
            pattern, error = _compile(item.value)
            phrase = error or f"{field.value} matches {value}"
            rules.append(_Rule(item, field, "regex", "", pattern, phrase))
        elif item.operator == "not_contains":
            phrase = f"{field.value} does not contain {value}"
            needle = item.value.casefold()
            rules.append(_Rule(item, field, "not_contains", needle, None, phrase))
        else:
            phrase = f"{field.value} contains {value}"
            needle = item.value.casefold()
            rules.append(_Rule(item, field, "contains", needle, None, phrase))
    return tuple(rules)


@lru_cache(maxsize=4096)
def _compile(value: str) -> tuple[regex.Pattern[str] | None, str]:
    try:
        return regex.compile(value, _REGEX_FLAGS), ""
    except (regex.error, ValueError, OverflowError, RecursionError) as exc:
        return None, f"invalid regex {_quote(value)} ({exc})"


def _quote(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > _QUOTE_LIMIT:
        text = text[: _QUOTE_LIMIT - 3] + "..."
    return repr(text)
