"""A channel's filters through the admin API: order, edits, and dry runs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from shared.catalog import Campaign, Catalog, Channel
from shared.settings import Settings
from tests.support.browser import AdminApi, admin_api

UNREACHABLE_BROKER = "amqp://guest:guest@127.0.0.1:1//"

REFUND_MAIL = (
    b"From: Ann Buyer <ann@customer.example>\r\n"
    b"To: support@example.test\r\n"
    b"Subject: Please refund order 1234\r\n"
    b"Message-ID: <refund-1@customer.example>\r\n"
    b"\r\n"
    b"Hello, the parcel arrived broken. Invoice number INV-2024-0042.\r\n"
)


@pytest.fixture(scope="module")
def running_api(database_url: str, secret_key: str) -> Iterator[AdminApi]:
    settings = Settings(
        database_url=database_url,
        secret_keys=secret_key,
        amqp_url=UNREACHABLE_BROKER,
        max_message_bytes=1024 * 1024,
        inline_max_bytes=1024,
        attachment_limit_bytes=4096,
    )
    with admin_api(settings) as running:
        yield running


@pytest.fixture
def api(running_api: AdminApi, clean_db: str) -> AdminApi:
    """The module's API server, on a database emptied for this test."""
    return running_api


@pytest.fixture
def campaigns(catalog: Catalog) -> dict[str, Campaign]:
    return {
        key: catalog.add_campaign(key, key.title())
        for key in ("general", "refunds", "billing", "vip")
    }


@pytest.fixture
def support(catalog: Catalog, campaigns: dict[str, Campaign]) -> Channel:
    return catalog.add_channel(
        "support",
        "support@example.test",
        default_campaign="general",
        inbound={
            "type": "imap",
            "host": "imap.example.test",
            "port": 993,
            "username": "support",
        },
    )


def add(api: AdminApi, channel: Channel, **body: Any) -> dict[str, Any]:
    created = api.admin.post(f"/api/channels/{channel.id}/filters", json=body)
    assert 201 == created.status_code, created.text
    result: dict[str, Any] = created.json()
    return result


def order(api: AdminApi, channel: Channel) -> list[tuple[int, str]]:
    listed = api.reader.get(f"/api/channels/{channel.id}/filters").json()
    return [(f["position"], f["value"]) for f in listed]


def test_filters_are_kept_in_the_order_they_were_added_with_their_campaign(
    api: AdminApi, support: Channel, campaigns: dict[str, Campaign]
) -> None:
    add(
        api,
        support,
        field="subject",
        value="refund",
        campaign_id=campaigns["refunds"].id,
    )
    add(
        api,
        support,
        field="body",
        operator="regex",
        value=r"INV-\d{4}-\d+",
        campaign_id=campaigns["billing"].id,
        stop=False,
    )

    listed = api.reader.get(f"/api/channels/{support.id}/filters").json()

    assert [
        (1, "subject", "contains", "refund", "refunds", True),
        (2, "body", "regex", r"INV-\d{4}-\d+", "billing", False),
    ] == [
        (
            f["position"],
            f["field"],
            f["operator"],
            f["value"],
            f["campaign"]["key"],
            f["stop"],
        )
        for f in listed
    ]
    assert 2 == api.reader.get(f"/api/channels/{support.id}").json()["filter_count"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"field": "header"}, "field"),
        ({"operator": "equals"}, "operator"),
        ({"value": ""}, "value"),
        ({"operator": "regex", "value": "(unclosed"}, "value"),
        ({"operator": "regex", "value": "a{2,1}"}, "value"),
        ({"campaign_id": 999}, "campaign_id"),
        ({"campaign_id": None}, "campaign_id"),
        ({"stop": "maybe"}, "stop"),
        ({"priority": 1}, "priority"),
    ],
)
def test_a_bad_filter_is_refused_with_a_message_naming_its_field(
    api: AdminApi,
    support: Channel,
    campaigns: dict[str, Campaign],
    changes: dict[str, Any],
    field: str,
) -> None:
    body = {"field": "subject", "value": "refund", "campaign_id": campaigns["vip"].id}

    refused = api.admin.post(
        f"/api/channels/{support.id}/filters", json={**body, **changes}
    )

    assert 422 == refused.status_code, refused.text
    assert field == refused.json()["field"]
    assert refused.json()["detail"].startswith(f"{field}: ")
    assert [] == order(api, support)


def test_filters_are_reordered_all_at_once_or_moved_one_at_a_time(
    api: AdminApi, support: Channel, campaigns: dict[str, Campaign]
) -> None:
    ids = [
        add(api, support, field="subject", value=v, campaign_id=campaigns["vip"].id)[
            "id"
        ]
        for v in ("one", "two", "three")
    ]

    reordered = api.admin.put(
        f"/api/channels/{support.id}/filters/order",
        json={"filter_ids": [ids[2], ids[0], ids[1]]},
    )
    after_reorder = order(api, support)
    moved = api.admin.post(
        f"/api/channels/{support.id}/filters/{ids[1]}/move", json={"position": 1}
    )

    assert 200 == reordered.status_code, reordered.text
    assert [(1, "three"), (2, "one"), (3, "two")] == after_reorder
    assert 200 == moved.status_code, moved.text
    assert [(1, "two"), (2, "three"), (3, "one")] == order(api, support)


def test_a_reorder_must_name_every_filter_once_and_a_move_stay_in_the_list(
    api: AdminApi, support: Channel, campaigns: dict[str, Campaign]
) -> None:
    ids = [
        add(api, support, field="subject", value=v, campaign_id=campaigns["vip"].id)[
            "id"
        ]
        for v in ("one", "two")
    ]
    url = f"/api/channels/{support.id}/filters"

    refused = [
        api.admin.put(f"{url}/order", json={"filter_ids": [ids[0]]}),
        api.admin.put(f"{url}/order", json={"filter_ids": [ids[0], ids[0]]}),
        api.admin.put(f"{url}/order", json={"filter_ids": [ids[1], ids[0], 999]}),
        api.admin.post(f"{url}/{ids[0]}/move", json={"position": 3}),
        api.admin.post(f"{url}/{ids[0]}/move", json={"position": 0}),
    ]

    assert ["filter_ids"] * 3 + ["position"] * 2 == [r.json()["field"] for r in refused]
    assert {422} == {r.status_code for r in refused}
    assert [(1, "one"), (2, "two")] == order(api, support)


def test_a_filter_is_edited_in_place_and_a_bad_edit_changes_nothing(
    api: AdminApi, support: Channel, campaigns: dict[str, Campaign]
) -> None:
    first = add(
        api, support, field="subject", value="refund", campaign_id=campaigns["vip"].id
    )
    url = f"/api/channels/{support.id}/filters/{first['id']}"

    edited = api.admin.patch(
        url,
        json={
            "operator": "regex",
            "value": "refund|return",
            "campaign_id": campaigns["refunds"].id,
            "stop": False,
        },
    )
    bad = api.admin.patch(url, json={"value": "[unclosed"})

    assert 200 == edited.status_code, edited.text
    assert ("subject", "regex", "refund|return", "refunds", False, 1) == (
        edited.json()["field"],
        edited.json()["operator"],
        edited.json()["value"],
        edited.json()["campaign"]["key"],
        edited.json()["stop"],
        edited.json()["position"],
    )
    assert (422, "value") == (bad.status_code, bad.json()["field"])
    assert [(1, "refund|return")] == order(api, support)


def test_a_deleted_filter_leaves_the_others_numbered_from_one(
    api: AdminApi, support: Channel, campaigns: dict[str, Campaign]
) -> None:
    ids = [
        add(api, support, field="subject", value=v, campaign_id=campaigns["vip"].id)[
            "id"
        ]
        for v in ("one", "two", "three")
    ]

    deleted = api.admin.delete(f"/api/channels/{support.id}/filters/{ids[0]}")

    assert 204 == deleted.status_code
    assert [(1, "two"), (2, "three")] == order(api, support)


def test_a_filter_of_another_channel_is_not_found_through_this_one(
    api: AdminApi, catalog: Catalog, support: Channel, campaigns: dict[str, Campaign]
) -> None:
    other = catalog.add_channel("other", "other@example.test")
    theirs = add(
        api, other, field="subject", value="x", campaign_id=campaigns["vip"].id
    )
    url = f"/api/channels/{support.id}/filters/{theirs['id']}"

    answers = [
        api.admin.patch(url, json={"value": "y"}).status_code,
        api.admin.delete(url).status_code,
        api.admin.post(f"{url}/move", json={"position": 1}).status_code,
    ]

    assert [404, 404, 404] == answers
    assert [(1, "x")] == order(api, other)


def dry_run(api: AdminApi, channel: Channel, raw: bytes) -> Any:
    return api.reader.post(
        f"/api/channels/{channel.id}/filters/dry-run",
        content=raw,
        headers={"Content-Type": "message/rfc822"},
    )


def test_a_dry_run_names_the_filter_the_text_it_matched_and_the_campaign(
    api: AdminApi, support: Channel, campaigns: dict[str, Campaign]
) -> None:
    add(
        api,
        support,
        field="sender",
        value="@vip.example",
        campaign_id=campaigns["vip"].id,
    )
    refund = add(
        api,
        support,
        field="subject",
        value="REFUND",
        campaign_id=campaigns["refunds"].id,
    )

    tried = dry_run(api, support, REFUND_MAIL)

    assert 200 == tried.status_code, tried.text
    result = tried.json()
    assert ("refunds", refund["id"], 2) == (
        result["campaign"]["key"],
        result["filter"]["id"],
        result["filter"]["position"],
    )
    assert "Please refund order 1234" == result["matched_text"]
    assert "subject contains 'REFUND'" in result["reason"]
    assert "Please refund order 1234" == result["subject"]


def test_a_dry_run_of_a_regex_shows_the_matched_part_and_a_miss_the_default(
    api: AdminApi, support: Channel, campaigns: dict[str, Campaign]
) -> None:
    add(
        api,
        support,
        field="body",
        operator="regex",
        value=r"INV-\d{4}-\d+",
        campaign_id=campaigns["billing"].id,
    )

    matched = dry_run(api, support, REFUND_MAIL).json()
    missed = dry_run(
        api, support, b"From: a@b.example\r\nSubject: hello\r\n\r\nnothing here\r\n"
    ).json()

    assert "billing" == matched["campaign"]["key"]
    assert "INV-2024-0042" in matched["matched_text"]
    assert "'INV-2024-0042'" in matched["reason"]
    assert ("general", None, None) == (
        missed["campaign"]["key"],
        missed["filter"],
        missed["matched_text"],
    )
    assert "default campaign" in missed["reason"]


def test_a_dry_run_without_a_default_campaign_says_where_nothing_would_go(
    api: AdminApi, catalog: Catalog
) -> None:
    bare = catalog.add_channel("bare", "bare@example.test")

    result = dry_run(api, bare, REFUND_MAIL).json()

    assert None is result["campaign"]
    assert "has no default campaign" in result["reason"]


def test_a_dry_run_refuses_what_is_not_mail_or_too_large(
    api: AdminApi, support: Channel
) -> None:
    empty = dry_run(api, support, b"")
    not_mail = dry_run(api, support, b"just some words without a header\r\n")
    too_large = dry_run(api, support, b"Subject: big\r\n\r\n" + b"x" * (1024 * 1024))

    assert (422, "message") == (empty.status_code, empty.json()["field"])
    assert (422, "message") == (not_mail.status_code, not_mail.json()["field"])
    assert 413 == too_large.status_code
    assert "MAILROOM_MAX_MESSAGE_BYTES" in too_large.json()["detail"]
