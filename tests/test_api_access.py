"""Who may use the admin API: tokens, roles, console sessions, and what the
API never gives away."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from services.admin.commands import token
from services.admin.tokens import Role, TokenStore
from shared import db
from shared.catalog import Catalog
from shared.settings import Settings, get_settings
from tests.support.browser import AdminApi, admin_api, bearer, make_token

UNREACHABLE_BROKER = "amqp://guest:guest@127.0.0.1:1//"
# Changes a read-only token may make: its own session, and trying filters.
READ_ONLY_MAY = {
    ("POST", "/api/session"),
    ("DELETE", "/api/session"),
    ("POST", "/api/channels/{channel_id}/filters/dry-run"),
}


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


@contextmanager
def token_store(url: str) -> Iterator[TokenStore]:
    with db.connect(url) as conn:
        yield TokenStore(conn)


def operations(api: AdminApi) -> list[tuple[str, str]]:
    paths = api.anonymous.get("/openapi.json").json()["paths"]
    return sorted(
        (method.upper(), path) for path, item in paths.items() for method in item
    )


def console(api: AdminApi) -> httpx.Client:
    """A client that keeps cookies, as the browser does."""
    return httpx.Client(base_url=api.base_url, trust_env=False, timeout=30)


def test_every_route_but_sign_in_refuses_a_request_without_a_token(
    api: AdminApi,
) -> None:
    answers = {
        (method, path): api.anonymous.request(
            method, path.format(channel_id=1, filter_id=1, entry_id=1)
        )
        for method, path in operations(api)
        # Sign-in, and the browser coming back from Microsoft (state proves it).
        if path not in ("/api/session", "/api/oauth/callback")
    }

    assert len(answers) >= 12
    assert {401} == {r.status_code for r in answers.values()}
    assert {"Bearer"} == {r.headers["WWW-Authenticate"] for r in answers.values()}
    assert all("mailroom token create" in r.json()["detail"] for r in answers.values())


def test_a_wrong_or_revoked_token_is_refused(api: AdminApi, clean_db: str) -> None:
    with token_store(clean_db) as store:
        info, given = store.create(f"revoke-{uuid.uuid4().hex[:8]}", Role.ADMIN)
    accepted = api.anonymous.get("/api/channels", headers=bearer(given))
    with token_store(clean_db) as store:
        store.revoke(info.name)

    revoked = api.anonymous.get("/api/channels", headers=bearer(given))
    wrong = api.anonymous.get("/api/channels", headers=bearer(given + "x"))
    basic = api.anonymous.get("/api/channels", auth=("admin", given))

    assert 200 == accepted.status_code
    assert [401, 401, 401] == [r.status_code for r in (revoked, wrong, basic)]


def test_a_read_only_token_may_read_and_try_filters_but_changes_nothing(
    api: AdminApi, catalog: Catalog
) -> None:
    general = catalog.add_campaign("general", "General")
    channel = catalog.add_channel(
        "support", "s@example.test", default_campaign="general"
    )
    item = catalog.add_filter(channel.id, "subject", "refund", general.id)
    changes = [
        (method, path)
        for method, path in operations(api)
        if method != "GET" and (method, path) not in READ_ONLY_MAY
    ]

    refused = {
        (method, path): api.reader.request(
            method,
            path.format(channel_id=channel.id, filter_id=item.id, entry_id=1),
            json={},
        ).status_code
        for method, path in changes
    }
    reads = [
        api.reader.get(path).status_code
        for path in (
            "/api/channels",
            f"/api/channels/{channel.id}",
            f"/api/channels/{channel.id}/filters",
            "/api/campaigns",
        )
    ]

    assert len(refused) >= 9
    assert {403} == set(refused.values()), refused
    assert [200, 200, 200, 200] == reads
    assert [channel.id] == [c.id for c in catalog.channels()]
    assert [item] == catalog.filters()


def test_the_read_only_refusal_says_an_admin_token_is_needed(api: AdminApi) -> None:
    refused = api.reader.post("/api/channels", json={"name": "x"})

    assert 403 == refused.status_code
    assert "needs a token with the admin role" in refused.json()["detail"]


def test_tokens_are_stored_only_as_hashes(api: AdminApi, clean_db: str) -> None:
    given = make_token(clean_db, Role.READ_ONLY)

    with token_store(clean_db) as store:
        rows = store.conn.execute("SELECT * FROM api_tokens").fetchall()

    assert rows
    assert not any(given in json.dumps(r, default=str) for r in rows)


def test_the_console_trades_a_token_for_a_session_cookie_and_signs_out(
    api: AdminApi, clean_db: str, catalog: Catalog
) -> None:
    catalog.add_channel("support", "s@example.test")
    given = make_token(clean_db, Role.ADMIN)
    with console(api) as browser:
        signed_in = browser.post("/api/session", json={"token": given})
        cookie = signed_in.headers["set-cookie"]
        who = browser.get("/api/session").json()
        listed = browser.get("/api/channels").status_code
        forged = browser.put("/api/channels/1/active", json={"active": False})
        genuine = browser.put(
            "/api/channels/1/active",
            json={"active": False},
            headers={"X-Mailroom-Console": "1"},
        )
        signed_out = browser.delete("/api/session")
        afterwards = browser.get("/api/channels").status_code

    assert 200 == signed_in.status_code
    assert given not in cookie
    assert "httponly" in cookie.lower()
    assert "samesite=strict" in cookie.lower()
    assert ("admin", 200) == (who["role"], listed)
    assert 403 == forged.status_code
    assert "X-Mailroom-Console" in forged.json()["detail"]
    assert 200 == genuine.status_code
    assert (204, 401) == (signed_out.status_code, afterwards)


def test_a_session_ends_when_its_token_is_revoked(api: AdminApi, clean_db: str) -> None:
    with token_store(clean_db) as store:
        info, given = store.create(f"revoke-{uuid.uuid4().hex[:8]}", Role.ADMIN)
    with console(api) as browser:
        browser.post("/api/session", json={"token": given})
        before = browser.get("/api/channels").status_code
        with token_store(clean_db) as store:
            store.revoke(info.name)
        after = browser.get("/api/channels").status_code
        again = browser.post("/api/session", json={"token": given}).status_code

    assert (200, 401, 401) == (before, after, again)


def test_a_read_only_session_cannot_change_anything_even_from_the_console(
    api: AdminApi, clean_db: str, catalog: Catalog
) -> None:
    catalog.add_channel("support", "s@example.test")
    with console(api) as browser:
        browser.post(
            "/api/session", json={"token": make_token(clean_db, Role.READ_ONLY)}
        )
        refused = browser.delete("/api/channels/1", headers={"X-Mailroom-Console": "1"})

    assert 403 == refused.status_code
    assert ["support"] == [c.name for c in catalog.channels()]


def test_passwords_appear_in_no_response_error_or_log_line(
    api: AdminApi, catalog: Catalog
) -> None:
    password = "pa55-word-that-must-not-leak"
    body: dict[str, Any] = {
        "name": "support",
        "address": "support@example.test",
        "inbound": {
            "type": "imap",
            "host": "imap.example.test",
            "port": 993,
            "username": "support",
        },
        "secrets": {"inbound_password": password, "client_secret": password},
    }
    with capture_logs() as logs:
        created = api.admin.post("/api/channels", json=body)
        refused = api.admin.post(
            "/api/channels",
            json={**body, "name": "", "inbound": {**body["inbound"], "port": password}},
        )
        shown = api.admin.get(f"/api/channels/{created.json()['id']}")
        edited = api.admin.patch(
            f"/api/channels/{created.json()['id']}",
            json={"secrets": {"outbound_password": password}},
        )

    assert [201, 422, 200, 200] == [
        r.status_code for r in (created, refused, shown, edited)
    ]
    for response in (created, refused, shown, edited):
        assert password not in response.text
    assert any(entry.get("event") == "request" for entry in logs)
    assert password not in repr(logs)


def test_the_openapi_document_describes_bodies_and_never_a_secret_value(
    api: AdminApi,
) -> None:
    document = api.anonymous.get("/openapi.json").json()
    schemas = document["components"]["schemas"]

    for name in (
        "ChannelIn",
        "ChannelPatch",
        "ChannelOut",
        "ChannelSummary",
        "FilterIn",
        "FilterOut",
        "DryRunOut",
        "CampaignIn",
        "ErrorOut",
    ):
        assert name in schemas
    assert {"password"} == {
        schemas["SecretsIn"]["properties"]["inbound_password"]["anyOf"][0]["format"]
    }
    assert "inbound_password" not in json.dumps(schemas["ChannelOut"]).replace(
        "inbound_password_set", ""
    )
    assert "message/rfc822" in json.dumps(
        document["paths"]["/api/channels/{channel_id}/filters/dry-run"]["post"]
    )
    assert "HTTPBearer" in document["components"]["securitySchemes"]


def test_the_console_page_forbids_framing_and_outside_scripts(api: AdminApi) -> None:
    page = api.anonymous.get("/")
    script = api.anonymous.get("/static/console.js")

    assert (200, 200) == (page.status_code, script.status_code)
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert "nosniff" == page.headers["X-Content-Type-Options"]
    assert '<script src="/static/console.js"' in page.text


@pytest.fixture
def cli(clean_db: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    monkeypatch.setenv("MAILROOM_DATABASE_URL", clean_db)
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


def test_tokens_made_by_the_cli_work_until_revoked_and_are_shown_only_once(
    api: AdminApi, cli: CliRunner
) -> None:
    anna = f"ops-anna-{uuid.uuid4().hex[:6]}"
    created = cli.invoke(token, ["create", anna, "--role", "admin"])
    given = created.output.strip().splitlines()[-1]
    duplicate = cli.invoke(token, ["create", anna])
    used = api.anonymous.post(
        "/api/channels", headers=bearer(given), json={"name": "made-by-anna"}
    )
    listed = cli.invoke(token, ["list", "--json"])
    revoked = cli.invoke(token, ["revoke", anna])
    after = api.anonymous.get("/api/channels", headers=bearer(given))

    assert 0 == created.exit_code, created.output
    assert given.startswith("mr_")
    assert 1 == duplicate.exit_code
    assert "exists" in duplicate.output
    assert 201 == used.status_code, used.text
    assert [(anna, "admin")] == [
        (t["name"], t["role"]) for t in json.loads(listed.output) if t["name"] == anna
    ]
    assert given not in listed.output
    assert 0 == revoked.exit_code
    assert 401 == after.status_code


def test_the_probes_and_metrics_answer_without_a_token(api: AdminApi) -> None:
    live = api.anonymous.get("/livez")
    ready = api.anonymous.get("/readyz")
    metrics = api.anonymous.get("/metrics")

    assert (200, "ok\n") == (live.status_code, live.text)
    assert (200, "ready\n") == (ready.status_code, ready.text)
    assert 200 == metrics.status_code
    assert "mailroom_messages_total" in metrics.text
