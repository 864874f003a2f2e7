"""The admin API's channels and campaigns, against a real server and database."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from shared.catalog import Catalog
from shared.settings import Settings
from shared.topology import Topology
from tests.conftest import AMQP_URL
from tests.support.browser import AdminApi, admin_api
from tests.support.queues import count

# Campaigns are added through the catalog in these tests, so the API never
# needs RabbitMQ; a closed port of 127.0.0.1 makes sure nothing is declared.
UNREACHABLE_BROKER = "amqp://guest:guest@127.0.0.1:1//"


@pytest.fixture(scope="module")
def running_api(database_url: str, secret_key: str) -> Iterator[AdminApi]:
    settings = Settings(
        database_url=database_url, secret_keys=secret_key, amqp_url=UNREACHABLE_BROKER
    )
    with admin_api(settings) as running:
        yield running


@pytest.fixture
def api(running_api: AdminApi, clean_db: str) -> AdminApi:
    """The module's API server, on a database emptied for this test."""
    return running_api


def imap(**changes: Any) -> dict[str, Any]:
    return {
        "type": "imap",
        "host": "imap.example.test",
        "port": 993,
        "security": "tls",
        "username": "support",
        **changes,
    }


def channel(**changes: Any) -> dict[str, Any]:
    return {
        "name": "support",
        "address": "support@example.test",
        "inbound": imap(),
        "secrets": {"inbound_password": "imap-secret-1"},
        **changes,
    }


def test_a_channel_is_stored_with_its_accounts_and_its_passwords_never_come_back(
    api: AdminApi, catalog: Catalog
) -> None:
    general = catalog.add_campaign("general", "General")
    body = channel(
        default_campaign_id=general.id,
        outbound={"type": "smtp", "host": "smtp.example.test", "username": "support"},
        sync_all_folders=True,
        secrets={"inbound_password": "imap-secret-1", "outbound_password": "smtp-2"},
    )

    created = api.admin.post("/api/channels", json=body)
    shown = api.admin.get(f"/api/channels/{created.json()['id']}")

    assert 201 == created.status_code, created.text
    assert {
        "inbound_password_set": True,
        "outbound_password_set": True,
        "client_secret_set": False,
        "refresh_token_set": False,
        "inbound_access_token_set": False,
        "outbound_access_token_set": False,
    } == shown.json()["secrets"]
    assert ("imap", 993, 587, "general", True) == (
        shown.json()["inbound"]["type"],
        shown.json()["inbound"]["port"],
        shown.json()["outbound"]["port"],
        shown.json()["default_campaign"]["key"],
        shown.json()["sync_all_folders"],
    )
    for text in (created.text, shown.text, api.admin.get("/api/channels").text):
        assert "imap-secret-1" not in text
        assert "smtp-2" not in text
    stored = catalog.conn.execute("SELECT secrets FROM channels").fetchone()
    assert stored is not None
    assert b"imap-secret-1" not in bytes(stored["secrets"])
    assert {"inbound_password": "imap-secret-1", "outbound_password": "smtp-2"} == (
        catalog.secrets(created.json()["id"])
    )


GRAPH = {
    "type": "graph",
    "tenant_id": "contoso.onmicrosoft.com",
    "client_id": "11111111-2222-3333-4444-555555555555",
    "mailbox": "support@contoso.test",
}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": None}, "name"),
        ({"address": "not-an-address"}, "address"),
        ({"address": "two@at@example.test"}, "address"),
        ({"address": "someone@bad_host!"}, "address"),
        ({"address": "", "sync_recipient_only": True}, "address"),
        ({"inbound": imap(port=0)}, "inbound.port"),
        ({"inbound": imap(port=65536)}, "inbound.port"),
        ({"inbound": imap(port="imaps")}, "inbound.port"),
        ({"inbound": imap(host="")}, "inbound.host"),
        ({"inbound": imap(host="mail server.example")}, "inbound.host"),
        ({"inbound": imap(host="-bad-.example")}, "inbound.host"),
        ({"inbound": imap(username="")}, "inbound.username"),
        ({"inbound": imap(security="ssl")}, "inbound.security"),
        ({"inbound": imap(colour="blue")}, "inbound.colour"),
        ({"inbound": {"type": "carrier-pigeon"}}, "inbound"),
        ({"inbound": {"host": "imap.example.test"}}, "inbound"),
        ({"inbound": {**GRAPH, "tenant_id": " contoso "}}, "inbound.tenant_id"),
        ({"inbound": {**GRAPH, "mailbox": ""}}, "inbound.mailbox"),
        ({"inbound": {**GRAPH, "client_id": ""}}, "inbound.client_id"),
        ({"outbound": {"type": "smtp", "host": "", "username": "u"}}, "outbound.host"),
        (
            {"outbound": {"type": "smtp", "host": "h", "username": "u", "port": -1}},
            "outbound.port",
        ),
        ({"outbound": {"type": "pop3", "host": "h", "username": "u"}}, "outbound"),
        ({"default_campaign_id": 999}, "default_campaign_id"),
        ({"default_campaign_id": "general"}, "default_campaign_id"),
        ({"secrets": {"inbound_password": 12345}}, "secrets.inbound_password"),
        ({"secrets": {"pin": "1234"}}, "secrets.pin"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_a_bad_input_is_refused_with_a_message_naming_its_field(
    api: AdminApi, changes: dict[str, Any], field: str
) -> None:
    refused = api.admin.post("/api/channels", json=channel(**changes))

    assert 422 == refused.status_code, refused.text
    assert field == refused.json()["field"]
    assert refused.json()["detail"].startswith(f"{field}: ")
    assert "12345" not in refused.text
    assert [] == api.admin.get("/api/channels").json()


def test_a_second_channel_of_the_same_name_is_refused(api: AdminApi) -> None:
    api.admin.post("/api/channels", json=channel())

    refused = api.admin.post("/api/channels", json=channel(address="b@example.test"))

    assert (422, "name") == (refused.status_code, refused.json()["field"])
    assert "exists" in refused.json()["detail"]


def test_a_channel_without_a_default_campaign_is_not_activated_and_is_told_why(
    api: AdminApi,
) -> None:
    refused_at_creation = api.admin.post("/api/channels", json=channel(active=True))
    nothing_created = api.admin.get("/api/channels").json()
    created = api.admin.post("/api/channels", json=channel()).json()
    refused_later = api.admin.put(
        f"/api/channels/{created['id']}/active", json={"active": True}
    )

    for refused in (refused_at_creation, refused_later):
        assert 422 == refused.status_code
        assert "default_campaign_id" == refused.json()["field"]
        assert "has no default campaign" in refused.json()["detail"]
    assert [] == nothing_created
    assert False is api.admin.get(f"/api/channels/{created['id']}").json()["active"]


def test_a_channel_with_a_default_campaign_is_enabled_and_disabled(
    api: AdminApi, catalog: Catalog
) -> None:
    general = catalog.add_campaign("general", "General")
    created = api.admin.post(
        "/api/channels", json=channel(default_campaign_id=general.id)
    ).json()

    enabled = api.admin.put(
        f"/api/channels/{created['id']}/active", json={"active": True}
    )
    polled_now = [c.id for c in catalog.channels(active_only=True)]
    disabled = api.admin.put(
        f"/api/channels/{created['id']}/active", json={"active": False}
    )

    assert (200, True) == (enabled.status_code, enabled.json()["active"])
    assert [created["id"]] == polled_now
    assert (200, False) == (disabled.status_code, disabled.json()["active"])


def test_an_edit_changes_only_the_fields_it_names_and_keeps_the_password(
    api: AdminApi, catalog: Catalog
) -> None:
    created = api.admin.post("/api/channels", json=channel()).json()
    url = f"/api/channels/{created['id']}"

    edited = api.admin.patch(url, json={"address": "help@example.test"})
    new_password = api.admin.patch(
        url, json={"secrets": {"inbound_password": "imap-secret-2"}}
    )
    kept = catalog.secrets(created["id"])
    removed = api.admin.patch(url, json={"secrets": {"inbound_password": ""}})

    assert 200 == edited.status_code, edited.text
    assert ("support", "help@example.test", created["inbound"]) == (
        edited.json()["name"],
        edited.json()["address"],
        edited.json()["inbound"],
    )
    assert True is new_password.json()["secrets"]["inbound_password_set"]
    assert {"inbound_password": "imap-secret-2"} == kept
    assert False is removed.json()["secrets"]["inbound_password_set"]
    assert "imap-secret-2" not in new_password.text


def test_an_edit_with_a_bad_input_names_the_field_and_changes_nothing(
    api: AdminApi,
) -> None:
    created = api.admin.post("/api/channels", json=channel()).json()
    url = f"/api/channels/{created['id']}"

    refused = api.admin.patch(
        url, json={"address": "new@example.test", "inbound": imap(port=70000)}
    )

    assert (422, "inbound.port") == (refused.status_code, refused.json()["field"])
    assert "support@example.test" == api.admin.get(url).json()["address"]


def test_a_new_account_or_password_needs_a_new_validation(
    api: AdminApi, catalog: Catalog
) -> None:
    created = api.admin.post("/api/channels", json=channel()).json()
    url = f"/api/channels/{created['id']}"
    catalog.record_validation(created["id"], {"ok": True})
    validated = api.admin.get(url).json()

    renamed = api.admin.patch(url, json={"name": "support-eu"}).json()
    moved = api.admin.patch(url, json={"inbound": imap(host="imap2.example.test")})

    assert ("active", "active") == (validated["status"], renamed["status"])
    assert ("inactive", "not validated yet", None) == (
        moved.json()["status"],
        moved.json()["status_detail"],
        moved.json()["last_validated_at"],
    )


def test_an_enabled_channel_keeps_its_default_campaign_unless_disabled_with_it(
    api: AdminApi, catalog: Catalog
) -> None:
    general = catalog.add_campaign("general", "General")
    created = api.admin.post(
        "/api/channels", json=channel(default_campaign_id=general.id, active=True)
    ).json()
    url = f"/api/channels/{created['id']}"

    refused = api.admin.patch(url, json={"default_campaign_id": None})
    together = api.admin.patch(url, json={"default_campaign_id": None, "active": False})

    assert (422, "default_campaign_id") == (
        refused.status_code,
        refused.json()["field"],
    )
    assert "deactivate it first" in refused.json()["detail"]
    assert (200, None, False) == (
        together.status_code,
        together.json()["default_campaign_id"],
        together.json()["active"],
    )


def test_a_deleted_channel_is_gone_with_its_filters(
    api: AdminApi, catalog: Catalog
) -> None:
    general = catalog.add_campaign("general", "General")
    created = api.admin.post("/api/channels", json=channel()).json()
    catalog.add_filter(created["id"], "subject", "refund", general.id)

    deleted = api.admin.delete(f"/api/channels/{created['id']}")
    again = api.admin.delete(f"/api/channels/{created['id']}")

    assert 204 == deleted.status_code
    assert 404 == api.admin.get(f"/api/channels/{created['id']}").status_code
    assert 404 == again.status_code
    assert [] == catalog.filters()


def _channel_with_state(catalog: Catalog, name: str, sql: str = "") -> int:
    item = catalog.add_channel(
        name, f"{name}@example.test", inbound=imap(), secrets={"inbound_password": "p"}
    )
    if sql:
        # The SET clause is one of this module's constants, never input.
        statement = f"UPDATE channels SET {sql} WHERE id = %s"  # noqa: S608
        catalog.conn.execute(statement, (item.id,))
    return item.id


def test_the_list_shows_filters_status_with_the_last_error_campaign_and_enabled(
    api: AdminApi, catalog: Catalog
) -> None:
    general = catalog.add_campaign("general", "General")
    working = _channel_with_state(
        catalog,
        "a-working",
        "last_validated_at = now(), validation = '{\"ok\": true}', "
        "last_poll_ok_at = now()",
    )
    catalog.set_default_campaign(working, general.id)
    catalog.set_active(working, True)
    catalog.add_filter(working, "subject", "refund", general.id)
    _channel_with_state(
        catalog,
        "b-refused",
        "last_validated_at = now(), "
        'validation = \'{"ok": false, "error": "login refused"}\'',
    )
    _channel_with_state(
        catalog,
        "c-failing",
        "last_validated_at = now(), validation = '{\"ok\": true}', "
        "consecutive_failures = 3, last_poll_error = 'connection timed out'",
    )
    _channel_with_state(catalog, "d-new")

    listed = api.reader.get("/api/channels")

    assert 200 == listed.status_code
    assert [
        ("a-working", 1, "active", "validated and polling", "general", True),
        ("b-refused", 0, "inactive", "validation failed: login refused", None, False),
        (
            "c-failing",
            0,
            "inactive",
            "polling failed 3 time(s) in a row: connection timed out",
            None,
            False,
        ),
        ("d-new", 0, "inactive", "not validated yet", None, False),
    ] == [
        (
            c["name"],
            c["filter_count"],
            c["status"],
            c["status_detail"],
            (c["default_campaign"] or {}).get("key"),
            c["active"],
        )
        for c in listed.json()
    ]


def names(api: AdminApi, **params: Any) -> list[str]:
    found = api.reader.get("/api/channels", params=params)
    assert 200 == found.status_code, found.text
    return [c["name"] for c in found.json()]


def test_quick_search_finds_any_part_of_the_name_ignoring_case(
    api: AdminApi, catalog: Catalog
) -> None:
    for name in ("Support-EU", "support-us", "sales", "100%_real"):
        _channel_with_state(catalog, name.lower().replace("%", "").replace("_", ""))
        catalog.conn.execute(
            "UPDATE channels SET name = %s WHERE name = %s",
            (name, name.lower().replace("%", "").replace("_", "")),
        )

    assert ["Support-EU", "support-us"] == names(api, q="PORT")
    assert ["sales"] == names(api, q="ale")
    assert ["100%_real"] == names(api, q="%_")
    assert [] == names(api, q="%x")
    assert ["100%_real", "sales", "Support-EU", "support-us"] == names(api, q="")


def test_advanced_search_combines_default_campaign_name_status_and_address(
    api: AdminApi, catalog: Catalog
) -> None:
    billing = catalog.add_campaign("billing", "Billing")
    other = catalog.add_campaign("other", "Other")
    ok = "last_validated_at = now(), validation = '{\"ok\": true}'"
    for name, campaign, state in (
        ("billing-eu", billing.id, ok),
        ("billing-us", billing.id, ""),
        ("support", other.id, ok),
    ):
        item = _channel_with_state(catalog, name, state)
        catalog.set_default_campaign(item, campaign)
    # Reaching billing through a filter does not make it the default.
    catalog.add_filter("support", "subject", "invoice", billing.id)

    assert ["billing-eu", "billing-us"] == names(api, default_campaign_id=billing.id)
    assert ["billing-eu"] == names(api, default_campaign_id=billing.id, status="active")
    assert ["billing-us"] == names(
        api, default_campaign_id=billing.id, status="inactive"
    )
    assert ["billing-eu", "support"] == names(api, status="active")
    assert ["billing-us"] == names(api, name="BILL", address="us@")
    assert ["billing-eu"] == names(api, q="billing", name="eu", status="all")
    assert [] == names(api, default_campaign_id=other.id, name="billing")


def test_a_search_with_an_unknown_campaign_or_status_names_the_parameter(
    api: AdminApi,
) -> None:
    campaign = api.reader.get("/api/channels", params={"default_campaign_id": 42})
    status = api.reader.get("/api/channels", params={"status": "sleeping"})

    assert (422, "default_campaign_id") == (
        campaign.status_code,
        campaign.json()["field"],
    )
    assert (422, "status") == (status.status_code, status.json()["field"])


def test_an_unknown_channel_is_not_found(api: AdminApi) -> None:
    for response in (
        api.reader.get("/api/channels/404"),
        api.admin.patch("/api/channels/404", json={"name": "x"}),
        api.admin.put("/api/channels/404/active", json={"active": False}),
        api.admin.delete("/api/channels/404"),
    ):
        assert 404 == response.status_code
        assert "no channel 404" in response.json()["detail"]


def test_campaigns_are_listed_and_one_added_through_the_api_gets_its_queue(
    settings: Settings,
) -> None:
    with admin_api(settings) as api:
        added = api.admin.post(
            "/api/campaigns", json={"key": "billing", "name": "Billing"}
        )
        duplicate = api.admin.post("/api/campaigns", json={"key": "billing"})
        bad_key = api.admin.post("/api/campaigns", json={"key": "Not A Key"})
        listed = api.reader.get("/api/campaigns").json()

    assert (201, "billing") == (added.status_code, added.json()["key"])
    queue = Topology(prefix=settings.broker_prefix).campaign_queue("billing")
    assert 0 == count(AMQP_URL, queue)
    assert (422, "key") == (duplicate.status_code, duplicate.json()["field"])
    assert (422, "key") == (bad_key.status_code, bad_key.json()["field"])
    assert [("billing", "Billing")] == [(c["key"], c["name"]) for c in listed]
