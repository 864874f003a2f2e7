"""Save and authorise through the admin API and the CLI, against the HTTPS
fake of Azure AD: the sign-in address, Microsoft's redirect back to the
callback, and the refresh token kept for the poller."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from click.testing import CliRunner

from services.admin.cli import main
from services.poller.graph import GraphMailbox
from shared import db
from shared.accounts import GraphAccount
from shared.catalog import Catalog
from shared.secrets import SecretBox
from shared.settings import Settings
from tests.support.browser import AdminApi, admin_api
from tests.support.graph_fake import GraphFake, RegisteredApp
from tests.support.tls import TestPki

TENANT = "2e6b0c4d-8a1f-4d3e-b5c7-9f0a1b2c3d4e"
SECRET = "Kp3~authorise.secret~0123456789abcdef"
MAILBOX = "queue@contoso.example"


@pytest.fixture(scope="module")
def running_api(database_url: str, secret_key: str) -> Iterator[AdminApi]:
    settings = Settings(database_url=database_url, secret_keys=secret_key)
    with admin_api(settings) as running:
        yield running


@pytest.fixture
def api(running_api: AdminApi, clean_db: str) -> AdminApi:
    return running_api


@pytest.fixture
def redirect_uri(running_api: AdminApi) -> str:
    # Azure AD takes http:// redirect URIs for localhost only.
    port = urlsplit(running_api.base_url).port
    return f"http://localhost:{port}/api/oauth/callback"


@pytest.fixture
def app(graph_fake: GraphFake, redirect_uri: str) -> RegisteredApp:
    graph_fake.add_mailbox(MAILBOX)
    graph_fake.signed_in_user = MAILBOX
    return graph_fake.register_app(
        TENANT, str(uuid.uuid4()), SECRET, redirect_uris=(redirect_uri,)
    )


def graph_channel(
    fake: GraphFake, app: RegisteredApp, redirect_uri: str
) -> dict[str, Any]:
    account = fake.account(
        app, MAILBOX, auth_flow="authorization_code", redirect_uri=redirect_uri
    )
    return {
        "name": "exchange",
        "address": MAILBOX,
        "inbound": account.model_dump(mode="json"),
        "secrets": {"client_secret": SECRET},
    }


def sign_in(url: str, pki: TestPki) -> str:
    """What the browser does at Microsoft: sign in, and be sent back."""
    answer = requests.get(
        url, allow_redirects=False, verify=str(pki.ca_file), timeout=10
    )
    assert 302 == answer.status_code, answer.text
    return str(answer.headers["Location"])


def back_at(api: AdminApi, returned: str) -> Any:
    """The browser arriving at the callback; it carries no API token."""
    parts = urlsplit(returned)
    return api.anonymous.get(f"{parts.path}?{parts.query}")


def stored_secrets(settings_url: str, key: str, channel_id: int) -> dict[str, str]:
    with db.connect(settings_url) as conn:
        return Catalog(conn, SecretBox(key)).secrets(channel_id)


def test_an_administrator_authorises_and_the_poller_can_sign_in(
    api: AdminApi,
    graph_fake: GraphFake,
    app: RegisteredApp,
    redirect_uri: str,
    pki: TestPki,
    database_url: str,
    secret_key: str,
) -> None:
    created = api.admin.post(
        "/api/channels", json=graph_channel(graph_fake, app, redirect_uri)
    ).json()

    started = api.admin.post(f"/api/channels/{created['id']}/authorise")
    assert 200 == started.status_code, started.text
    returned = sign_in(started.json()["authorization_url"], pki)
    finished = back_at(api, returned)

    assert 200 == finished.status_code, finished.text
    assert "Channel exchange is authorised" in finished.text
    assert redirect_uri == started.json()["redirect_uri"]
    channel = api.admin.get(f"/api/channels/{created['id']}").json()
    assert channel["secrets"]["refresh_token_set"]

    secrets = stored_secrets(database_url, secret_key, created["id"])
    account = GraphAccount.model_validate(channel["inbound"])
    with GraphMailbox(account, secrets, timeout=10) as mailbox:
        assert [graph_fake.folder_id(MAILBOX, "inbox")] == mailbox.folders(
            all_folders=False
        )


def test_a_read_only_token_cannot_start_a_sign_in(
    api: AdminApi, graph_fake: GraphFake, app: RegisteredApp, redirect_uri: str
) -> None:
    created = api.admin.post(
        "/api/channels", json=graph_channel(graph_fake, app, redirect_uri)
    ).json()

    refused = api.reader.post(f"/api/channels/{created['id']}/authorise")

    assert 403 == refused.status_code


def test_a_forged_or_altered_state_stores_nothing(
    api: AdminApi,
    graph_fake: GraphFake,
    app: RegisteredApp,
    redirect_uri: str,
    pki: TestPki,
) -> None:
    created = api.admin.post(
        "/api/channels", json=graph_channel(graph_fake, app, redirect_uri)
    ).json()
    started = api.admin.post(f"/api/channels/{created['id']}/authorise").json()
    returned = sign_in(started["authorization_url"], pki)
    query = parse_qs(urlsplit(returned).query)
    forged = f"/api/oauth/callback?code={query['code'][0]}&state=made-up"

    answer = api.anonymous.get(forged)

    assert 400 == answer.status_code
    assert "Start again with Save and authorise" in answer.text
    channel = api.admin.get(f"/api/channels/{created['id']}").json()
    assert not channel["secrets"]["refresh_token_set"]


def test_microsofts_refusal_is_shown_in_plain_words(
    api: AdminApi, graph_fake: GraphFake, app: RegisteredApp, redirect_uri: str
) -> None:
    created = api.admin.post(
        "/api/channels", json=graph_channel(graph_fake, app, redirect_uri)
    ).json()
    started = api.admin.post(f"/api/channels/{created['id']}/authorise").json()
    state = parse_qs(urlsplit(started["authorization_url"]).query)["state"][0]

    answer = api.anonymous.get(
        "/api/oauth/callback",
        params={
            "state": state,
            "error": "consent_required",
            "error_description": "AADSTS65001: The user or administrator has not "
            "consented to use the application.",
        },
    )

    assert 400 == answer.status_code
    assert "grant admin consent for Mail.ReadWrite and Mail.Send" in answer.text


def test_a_channel_that_signs_in_with_passwords_has_nothing_to_authorise(
    api: AdminApi,
) -> None:
    created = api.admin.post(
        "/api/channels",
        json={
            "name": "plain",
            "address": "plain@example.test",
            "inbound": {
                "type": "imap",
                "host": "imap.example.test",
                "port": 993,
                "username": "plain",
            },
        },
    ).json()

    refused = api.admin.post(f"/api/channels/{created['id']}/authorise")

    assert 422 == refused.status_code
    assert "authorisation" == refused.json()["field"]
    assert "nothing to authorise" in refused.json()["detail"]


def test_the_cli_authorises_with_the_address_the_browser_came_back_to(
    graph_fake: GraphFake,
    app: RegisteredApp,
    redirect_uri: str,
    pki: TestPki,
    catalog: Catalog,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    account = graph_fake.account(
        app, MAILBOX, auth_flow="authorization_code", redirect_uri=redirect_uri
    )
    catalog.add_channel(
        "exchange",
        address=MAILBOX,
        inbound=account.model_dump(mode="json"),
        secrets={"client_secret": SECRET},
    )
    monkeypatch.setenv(
        "MAILROOM_DATABASE_URL", settings.database_url.get_secret_value()
    )
    monkeypatch.setenv("MAILROOM_SECRET_KEYS", settings.secret_keys.get_secret_value())
    runner = CliRunner()

    # The administrator opens the address printed and signs in, then gives
    # the address the browser ended up on (here in a second run, which the
    # first run's sign-in still serves for 15 minutes).
    asked = runner.invoke(main, ["channel", "authorise", "exchange"], input="")
    url = next(
        line for line in asked.output.splitlines() if line.startswith("https://")
    )
    returned = sign_in(url, pki)
    result = runner.invoke(
        main, ["channel", "authorise", "exchange", "--returned-url", returned]
    )

    assert "Address the browser was sent back to" in asked.output
    assert 0 == result.exit_code, result.output
    assert "channel exchange is authorised" in result.output
    assert "refresh_token" in catalog.secrets(catalog.channel("exchange").id)
