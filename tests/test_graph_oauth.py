"""The authorization-code flow end to end against the HTTPS fake of Azure AD,
and each refusal turned into plain words naming the setting to fix."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from services.admin.oauth import authorization_url, redeem_code
from services.poller.graph import GraphMailbox
from shared.accounts import GraphAccount
from shared.errors import ChannelAuthError, ValidationFailed
from tests.support.graph_fake import GraphFake, RegisteredApp
from tests.support.tls import TestPki

TENANT = "5f8c1a9e-2b7d-4c1e-9a3f-0d6e8b2c4a71"
CLIENT_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
SECRET = "Xy7~secret.value~0123456789abcdefABCDEF"
MAILBOX = "agent@contoso.example"
REDIRECT = "https://mailroom.contoso.example/oauth/callback"
SECRETS = {"client_secret": SECRET}


@pytest.fixture
def app(graph_fake: GraphFake) -> RegisteredApp:
    graph_fake.add_mailbox(MAILBOX)
    graph_fake.signed_in_user = MAILBOX
    return graph_fake.register_app(TENANT, CLIENT_ID, SECRET, redirect_uris=(REDIRECT,))


def delegated(fake: GraphFake, app: RegisteredApp, **changes: str) -> GraphAccount:
    account = fake.account(
        app, MAILBOX, auth_flow="authorization_code", redirect_uri=REDIRECT
    )
    return account.model_copy(update=changes)


def sign_in(url: str, pki: TestPki) -> dict[str, str]:
    """What a browser does: follow the sign-in to the redirect and read it."""
    answer = requests.get(
        url, allow_redirects=False, verify=str(pki.ca_file), timeout=10
    )
    assert 302 == answer.status_code, answer.text
    query = parse_qs(urlsplit(answer.headers["Location"]).query)
    return {name: values[0] for name, values in query.items()}


def test_the_authorization_url_asks_the_tenant_for_a_code_that_can_stay_signed_in(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    url = authorization_url(delegated(graph_fake, app), SECRETS, state="s-42")

    parts = urlsplit(url)
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    assert f"/{TENANT}/oauth2/v2.0/authorize" == parts.path
    assert (CLIENT_ID, REDIRECT, "s-42", "code") == (
        query["client_id"],
        query["redirect_uri"],
        query["state"],
        query["response_type"],
    )
    assert {
        "offline_access",
        "https://graph.microsoft.com/Mail.ReadWrite.Shared",
        "https://graph.microsoft.com/Mail.Send.Shared",
    } <= set(query["scope"].split())


def test_a_redeemed_code_lets_the_poller_read_the_mailbox_and_rotates_the_token(
    graph_fake: GraphFake, app: RegisteredApp, pki: TestPki
) -> None:
    account = delegated(graph_fake, app)
    answer = sign_in(authorization_url(account, SECRETS, state="s-1"), pki)

    secrets = redeem_code(account, SECRETS, answer["code"])
    with GraphMailbox(account, secrets, timeout=10) as box:
        folders = box.folders(all_folders=False)
        rotated = box.updated_secrets
    with GraphMailbox(account, rotated, timeout=10) as box:
        folders_again = box.folders(all_folders=False)

    assert "s-1" == answer["state"]
    assert SECRET == secrets["client_secret"]
    assert [graph_fake.folder_id(MAILBOX, "inbox")] == folders
    assert secrets["refresh_token"] != rotated["refresh_token"]
    assert folders == folders_again


def test_a_stale_refresh_token_asks_to_authorise_the_channel_again(
    graph_fake: GraphFake, app: RegisteredApp, pki: TestPki
) -> None:
    account = delegated(graph_fake, app)
    answer = sign_in(authorization_url(account, SECRETS, state="s-1"), pki)
    secrets = redeem_code(account, SECRETS, answer["code"])
    graph_fake.expire_refresh_tokens()

    with pytest.raises(ChannelAuthError) as caught:
        GraphMailbox(account, secrets, timeout=10).__enter__()

    assert "(AADSTS700082)" in str(caught.value)
    assert "use Save and authorise to sign in again" in str(caught.value)


def test_a_channel_never_authorised_says_how_to_authorise_it(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    with pytest.raises(ChannelAuthError) as caught:
        GraphMailbox(delegated(graph_fake, app), SECRETS, timeout=10).__enter__()

    assert "has not been authorised yet" in str(caught.value)


def test_a_redirect_uri_the_app_does_not_have_is_named_with_where_to_add_it(
    graph_fake: GraphFake, app: RegisteredApp, pki: TestPki
) -> None:
    answer = sign_in(authorization_url(delegated(graph_fake, app), SECRETS, "s"), pki)
    elsewhere = delegated(
        graph_fake, app, redirect_uri="https://mailroom.contoso.example/other"
    )

    with pytest.raises(ValidationFailed) as caught:
        redeem_code(elsewhere, SECRETS, answer["code"])

    assert "redirect_uri" == caught.value.field
    assert "(AADSTS50011)" in caught.value.message
    assert "'https://mailroom.contoso.example/other'" in caught.value.message
    assert "Redirect URIs" in caught.value.message


def test_signing_in_with_an_unregistered_redirect_uri_stops_at_microsoft(
    graph_fake: GraphFake, app: RegisteredApp, pki: TestPki
) -> None:
    elsewhere = delegated(graph_fake, app, redirect_uri="https://elsewhere.example/cb")
    url = authorization_url(elsewhere, SECRETS, state="s")

    page = requests.get(url, allow_redirects=False, verify=str(pki.ca_file), timeout=10)

    assert 400 == page.status_code
    assert "AADSTS50011" in page.text


def test_missing_consent_says_to_grant_admin_consent(
    graph_fake: GraphFake, pki: TestPki
) -> None:
    graph_fake.add_mailbox(MAILBOX)
    app = graph_fake.register_app(
        TENANT, CLIENT_ID, SECRET, redirect_uris=(REDIRECT,), consented=False
    )
    account = delegated(graph_fake, app)
    answer = sign_in(authorization_url(account, SECRETS, state="s"), pki)

    with pytest.raises(ValidationFailed) as caught:
        redeem_code(account, SECRETS, answer["code"])

    assert "consent" == caught.value.field
    assert "(AADSTS65001)" in caught.value.message
    assert "grant admin consent" in caught.value.message


def test_a_wrong_client_secret_says_to_paste_its_value(
    graph_fake: GraphFake, app: RegisteredApp, pki: TestPki
) -> None:
    account = delegated(graph_fake, app)
    answer = sign_in(authorization_url(account, SECRETS, state="s"), pki)
    wrong = {"client_secret": "1a2b3c4d-secret-id-not-value"}

    with pytest.raises(ValidationFailed) as caught:
        redeem_code(account, wrong, answer["code"])

    assert "client_secret" == caught.value.field
    assert "(AADSTS7000215)" in caught.value.message
    assert "Value, not its Secret ID" in caught.value.message
    assert wrong["client_secret"] not in caught.value.message


def test_white_space_around_the_secret_is_caught_before_asking_microsoft(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    with pytest.raises(ValidationFailed) as caught:
        authorization_url(
            delegated(graph_fake, app), {"client_secret": SECRET + " "}, state="s"
        )

    assert "client_secret" == caught.value.field
    assert "white space at its start or end" in caught.value.message
    assert 0 == graph_fake.count("GET", r"openid-configuration$")


@pytest.mark.parametrize("field", ["client_id", "tenant_id", "redirect_uri"])
def test_white_space_around_an_id_is_named_with_its_field(
    graph_fake: GraphFake, app: RegisteredApp, field: str
) -> None:
    account = delegated(graph_fake, app)
    padded = delegated(graph_fake, app, **{field: f" {getattr(account, field)}\t"})

    with pytest.raises(ValidationFailed) as caught:
        authorization_url(padded, SECRETS, state="s")

    assert field == caught.value.field
    assert "white space" in caught.value.message


def test_an_unknown_tenant_is_named_in_the_authorization_step(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    account = delegated(graph_fake, app, tenant_id="contoso.onmicrosoft.example")

    with pytest.raises(ValidationFailed) as caught:
        authorization_url(account, SECRETS, state="s")

    assert "tenant_id" == caught.value.field
    assert "(AADSTS90002)" in caught.value.message


def test_a_client_credentials_channel_is_not_authorised_this_way(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    account = graph_fake.account(app, MAILBOX)

    with pytest.raises(ValidationFailed) as caught:
        authorization_url(account, SECRETS, state="s")

    assert "auth_flow" == caught.value.field
