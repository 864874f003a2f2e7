"""IMAP and SMTP accounts that sign in with SASL XOAUTH2.

Dovecot takes XOAUTH2 and checks each token by asking the fake of Azure AD
(token introspection), and the test SMTP server checks tokens against the
same fake, so a token counts only if the fake issued it, for that mailbox,
with the permission the protocol needs, and it has not expired.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from services.admin.oauth import (
    SignIn,
    authorization_url,
    channel_sign_in,
    redeem_code,
)
from services.admin.validation import validate_channel
from services.admin.validation_verdicts import Kind
from services.poller.imap import ImapMailbox
from services.poller.pop3 import Pop3Mailbox
from services.poller.worker import Poller
from services.sender.smtp import SmtpConnection
from shared.accounts import (
    ImapAccount,
    MicrosoftLogin,
    Pop3Account,
    SmtpAccount,
    TokenLogin,
)
from shared.catalog import Catalog, Channel
from shared.errors import (
    ChannelAuthError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
)
from shared.models import Address, OutboundEmail
from shared.oauth import (
    IMAP_SCOPES,
    POP3_SCOPES,
    SMTP_SCOPES,
    HttpSession,
    TokenSource,
)
from shared.settings import Settings
from shared.xoauth2 import Bearers, StoredToken
from tests.support.dovecot import Dovecot
from tests.support.graph_fake import GraphFake, RegisteredApp
from tests.support.outbound import publish_replies
from tests.support.processes import Service, service_env
from tests.support.smtp import Mode, SmtpServer
from tests.support.tls import TestPki

TENANT = "9d1e7c2a-4b3f-4e8d-a1c6-2f5b8e0d3a94"
CLIENT_ID = "3c4d5e6f-7a8b-4c9d-8e0f-1a2b3c4d5e6f"
SECRET = "Qz8~mail.secret~abcdefghijABCDEFGHIJ0123"
REDIRECT = "https://mailroom.contoso.example/api/oauth/callback"
PERMISSIONS = (
    "IMAP.AccessAsUser.All",
    "POP.AccessAsUser.All",
    "SMTP.Send",
    "SMTP.SendAsApp",
)


@pytest.fixture(scope="module")
def fake(pki: TestPki) -> Iterator[GraphFake]:
    with GraphFake(pki) as started:
        yield started


@pytest.fixture(scope="module")
def oauth_dovecot(pki: TestPki, fake: GraphFake) -> Iterator[Dovecot]:
    with Dovecot(pki, introspection_url=f"{fake.url}/_exchange/introspect") as server:
        yield server


@pytest.fixture
def app(fake: GraphFake) -> RegisteredApp:
    """A fresh app registration, and a person of its own to sign in as."""
    fake.signed_in_user = f"agent-{uuid.uuid4().hex[:8]}@contoso.example"
    client_id = str(uuid.uuid4())
    return fake.register_app(
        TENANT, client_id, SECRET, redirect_uris=(REDIRECT,), permissions=PERMISSIONS
    )


@pytest.fixture
def user(oauth_dovecot: Dovecot, fake: GraphFake, app: RegisteredApp) -> str:
    """The signed-in person's mailbox; the password only lets the test append."""
    oauth_dovecot.add_user(fake.signed_in_user, uuid.uuid4().hex)
    return fake.signed_in_user


def login(fake: GraphFake, app: RegisteredApp, **changes: Any) -> MicrosoftLogin:
    settings: dict[str, Any] = {
        "tenant_id": app.tenant,
        "client_id": app.client_id,
        "authority_host": fake.url,
        "ca_file": str(fake.pki.ca_file),
        "auth_flow": "authorization_code",
        "redirect_uri": REDIRECT,
        **changes,
    }
    return MicrosoftLogin(**settings)


def imap_account(server: Dovecot, user: str, oauth2: Any) -> ImapAccount:
    return ImapAccount(
        host=server.host,
        port=server.imaps_port,
        security="tls",
        username=user,
        ca_file=str(server.pki.ca_file),
        oauth2=oauth2,
    )


def message(subject: str) -> bytes:
    mail = EmailMessage()
    mail["From"] = "customer@example.org"
    mail["To"] = "support@contoso.example"
    mail["Subject"] = subject
    mail["Message-ID"] = f"<{uuid.uuid4()}@example.org>"
    mail.set_content("Hello.")
    return bytes(mail)


def authorise(channel: Channel, pki: TestPki) -> dict[str, str]:
    """Save and authorise, as an administrator's browser would do it."""
    sign_in: SignIn = channel_sign_in(channel)
    secrets = {"client_secret": SECRET}
    url = authorization_url(sign_in.app, secrets, "s", sign_in.scopes.delegated)
    answer = requests.get(
        url, allow_redirects=False, verify=str(pki.ca_file), timeout=10
    )
    query = parse_qs(urlsplit(answer.headers["Location"]).query)
    code = query["code"][0]
    return redeem_code(sign_in.app, secrets, code, sign_in.first_resource)


def channel_of(inbound: Any = None, outbound: Any = None) -> Channel:
    return Channel(
        id=11,
        name="xoauth2",
        address="support@contoso.example",
        default_campaign_id=None,
        active=False,
        inbound=inbound,
        outbound=outbound,
    )


def source(
    fake: GraphFake, login: Any, secrets: dict[str, str], scopes: Any = IMAP_SCOPES
) -> TokenSource:
    http = HttpSession(10, str(fake.pki.ca_file))
    return TokenSource(login, secrets, scopes, http=http)


def inbox_subjects(account: ImapAccount, credential: Any) -> list[str]:
    with ImapMailbox(account, credential, timeout=10) as mailbox:
        found = [
            fetched
            for batch, _ in mailbox.fetch_new("INBOX", None, batch=50, max_bytes=10**7)
            for fetched in batch
        ]
    return [
        line.decode().removeprefix("Subject: ")
        for item in found
        for line in (item.data or b"").splitlines()
        if line.startswith(b"Subject:")
    ]


# IMAP


def test_a_person_who_authorised_the_channel_lets_the_poller_read_by_xoauth2(
    fake: GraphFake, app: RegisteredApp, oauth_dovecot: Dovecot, user: str
) -> None:
    oauth_dovecot.append(user, message("order 1"))
    account = imap_account(oauth_dovecot, user, login(fake, app))
    secrets = authorise(channel_of(inbound=account), fake.pki)

    bearer = source(fake, account.oauth2, secrets)
    subjects = inbox_subjects(account, bearer)

    assert ["order 1"] == subjects
    # Redeeming the refresh token rotated it; the old one is void at the fake.
    assert secrets["refresh_token"] != bearer.updated_secrets["refresh_token"]


def test_the_authorisation_asks_for_imap_and_smtp_in_one_sign_in(
    fake: GraphFake, app: RegisteredApp
) -> None:
    imap = ImapAccount(
        host="127.0.0.1", port=993, username="x", oauth2=login(fake, app)
    )
    smtp = SmtpAccount(host="127.0.0.1", port=25, username="x", oauth2=login(fake, app))
    sign_in = channel_sign_in(channel_of(inbound=imap, outbound=smtp))

    url = authorization_url(
        sign_in.app, {"client_secret": SECRET}, "s", sign_in.scopes.delegated
    )
    scopes = set(parse_qs(urlsplit(url).query)["scope"][0].split())

    assert {
        "https://outlook.office.com/IMAP.AccessAsUser.All",
        "https://outlook.office.com/SMTP.Send",
        "offline_access",
    } <= scopes


def test_a_token_the_server_refuses_is_named_as_the_problem(
    oauth_dovecot: Dovecot, user: str
) -> None:
    account = imap_account(oauth_dovecot, user, TokenLogin())
    bearer = StoredToken(
        {"inbound_access_token": "not-a-token-anyone-issued"}, "inbound_access_token"
    )

    with pytest.raises(ChannelAuthError) as caught:
        ImapMailbox(account, bearer, timeout=10).__enter__()

    assert "refused the OAuth token" in str(caught.value)
    assert user in str(caught.value)
    assert "not-a-token" not in str(caught.value)


def test_an_expired_token_is_renewed_and_the_login_tried_again(
    fake: GraphFake, app: RegisteredApp, oauth_dovecot: Dovecot, user: str
) -> None:
    oauth_dovecot.append(user, message("after renewal"))
    account = imap_account(oauth_dovecot, user, login(fake, app))
    bearer = source(
        fake, account.oauth2, authorise(channel_of(inbound=account), fake.pki)
    )
    first = bearer.access_token()
    fake.expire_tokens()

    subjects = inbox_subjects(account, bearer)

    assert ["after renewal"] == subjects
    assert first != bearer.access_token()


def test_a_token_stored_by_another_system_is_used_as_it_is(
    fake: GraphFake, app: RegisteredApp, oauth_dovecot: Dovecot, user: str
) -> None:
    oauth_dovecot.append(user, message("stored token"))
    account = imap_account(oauth_dovecot, user, login(fake, app))
    token = source(
        fake, account.oauth2, authorise(channel_of(inbound=account), fake.pki)
    ).access_token()

    stored = imap_account(oauth_dovecot, user, TokenLogin())
    bearer = StoredToken({"inbound_access_token": token}, "inbound_access_token")

    assert ["stored token"] == inbox_subjects(stored, bearer)


def test_the_poller_logs_in_by_xoauth2_and_keeps_the_rotated_refresh_token(
    fake: GraphFake,
    app: RegisteredApp,
    oauth_dovecot: Dovecot,
    user: str,
    catalog: Catalog,
    settings: Settings,
) -> None:
    oauth_dovecot.append(user, message("polled with a token"))
    account = imap_account(oauth_dovecot, user, login(fake, app))
    secrets = authorise(channel_of(inbound=account), fake.pki)
    catalog.add_campaign("general", "General")
    channel = catalog.add_channel(
        "xoauth2",
        address="support@contoso.example",
        default_campaign="general",
        inbound=account.model_dump(mode="json"),
        secrets=secrets,
    )
    catalog.set_active(channel.id, True)

    poller = Poller(settings)
    stop = threading.Event()
    thread = threading.Thread(target=poller.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert poller.ready.wait(10)
        published = wait_for_published(catalog, channel.id)
    finally:
        stop.set()
        thread.join(10)

    stored = catalog.secrets(channel.id)
    assert published
    assert stored["refresh_token"] != secrets["refresh_token"]
    assert SECRET == stored["client_secret"]


def wait_for_published(catalog: Catalog, channel_id: int) -> bool:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        row = catalog.conn.execute(
            "SELECT last_poll_ok_at, last_poll_error FROM channels WHERE id = %s",
            (channel_id,),
        ).fetchone()
        assert row is not None
        assert not row["last_poll_error"], row["last_poll_error"]
        if row["last_poll_ok_at"]:
            return True
        time.sleep(0.1)
    return False


# SMTP


@pytest.fixture
def smtp(smtp_server_factory: Any, fake: GraphFake) -> SmtpServer:
    def check(user: str, token: str) -> bool:
        return fake.mail_token_valid(user, token, "SMTP.Send")

    server: SmtpServer = smtp_server_factory(Mode.STARTTLS, token_check=check)
    return server


def smtp_account(server: SmtpServer, user: str, oauth2: Any) -> SmtpAccount:
    return server.account(username=user, oauth2=oauth2)


def test_the_sender_signs_in_as_the_app_and_sends_by_xoauth2(
    fake: GraphFake, app: RegisteredApp, smtp: SmtpServer
) -> None:
    mailbox = "support@contoso.example"
    account = smtp_account(
        smtp, mailbox, login(fake, app, auth_flow="client_credentials")
    )
    bearer = source(fake, account.oauth2, {"client_secret": SECRET}, SMTP_SCOPES)

    with SmtpConnection(account, bearer, timeout=10) as connection:
        connection.send(mailbox, ["customer@example.org"], message("reply"))

    [received] = smtp.wait_for(1)
    [attempt] = smtp.logins
    assert ("XOAUTH2", mailbox, True) == (
        attempt.mechanism,
        attempt.username,
        attempt.accepted,
    )
    assert received.login == mailbox
    assert received.tls


def test_a_refused_token_fails_the_message_with_the_servers_words(
    smtp: SmtpServer,
) -> None:
    account = smtp_account(smtp, "support@contoso.example", TokenLogin())
    bearer = StoredToken({"outbound_access_token": "forged"}, "outbound_access_token")

    with pytest.raises(PermanentDeliveryError) as caught:
        with SmtpConnection(account, bearer, timeout=10) as connection:
            connection.send("support@contoso.example", ["a@example.org"], message("x"))

    assert "refused the OAuth token" in str(caught.value)
    assert 535 == caught.value.code
    assert [] == smtp.messages
    assert [False] == [a.accepted for a in smtp.logins]


def test_azure_ad_out_of_reach_leaves_the_message_to_be_retried(
    fake: GraphFake, app: RegisteredApp, smtp: SmtpServer
) -> None:
    closed = login(
        fake, app, auth_flow="client_credentials", authority_host="https://127.0.0.1:9"
    )
    account = smtp_account(smtp, "support@contoso.example", closed)
    bearer = source(fake, closed, {"client_secret": SECRET}, SMTP_SCOPES)

    with pytest.raises(TemporaryDeliveryError) as caught:
        with SmtpConnection(account, bearer, timeout=10) as connection:
            connection.send("support@contoso.example", ["a@example.org"], message("x"))

    assert "cannot reach Azure AD" in str(caught.value)
    assert [] == smtp.messages


# Validate


def test_validate_signs_in_and_logs_in_to_both_servers(
    fake: GraphFake,
    app: RegisteredApp,
    oauth_dovecot: Dovecot,
    user: str,
    smtp: SmtpServer,
) -> None:
    inbound = imap_account(oauth_dovecot, user, login(fake, app))
    outbound = smtp_account(smtp, user, login(fake, app))
    item = channel_of(inbound=inbound, outbound=outbound)
    secrets = authorise(item, fake.pki)

    report = validate_channel(
        item, secrets, Settings(metrics_port=0), allow_private=True, step_seconds=10
    )

    assert (Kind.OK, Kind.OK) == (report.inbound.kind, report.outbound.kind), report
    assert report.rotated_secrets["refresh_token"] != secrets["refresh_token"]
    assert [True] == [a.accepted for a in smtp.logins]


def test_validate_names_a_wrong_client_secret_as_a_token_error(
    fake: GraphFake, app: RegisteredApp, oauth_dovecot: Dovecot, user: str
) -> None:
    inbound = imap_account(oauth_dovecot, user, login(fake, app))
    item = channel_of(inbound=inbound)
    secrets = {**authorise(item, fake.pki), "client_secret": "a-wrong-secret-value"}

    report = validate_channel(
        item, secrets, Settings(metrics_port=0), allow_private=True, step_seconds=10
    )

    assert Kind.TOKEN_ERROR == report.inbound.kind
    assert "client_secret" == report.inbound.field
    assert "AADSTS7000215" in report.inbound.message


def test_validate_names_a_token_the_imap_server_refuses(
    oauth_dovecot: Dovecot, user: str
) -> None:
    inbound = imap_account(oauth_dovecot, user, TokenLogin())
    item = channel_of(inbound=inbound)

    report = validate_channel(
        item,
        {"inbound_access_token": "expired-or-forged"},
        Settings(metrics_port=0),
        allow_private=True,
        step_seconds=10,
    )

    assert Kind.AUTH_FAILURE == report.inbound.kind
    assert "inbound.oauth2" == report.inbound.field
    assert "expired-or-forged" not in report.model_dump_json()


def test_the_sender_process_sends_by_xoauth2_and_keeps_the_rotated_token(
    fake: GraphFake,
    app: RegisteredApp,
    smtp: SmtpServer,
    catalog: Catalog,
    settings: Settings,
    tmp_path: Path,
) -> None:
    mailbox = fake.signed_in_user
    account = smtp_account(smtp, mailbox, login(fake, app))
    secrets = authorise(channel_of(outbound=account), fake.pki)
    catalog.add_campaign("general", "General")
    channel = catalog.add_channel(
        "xoauth2-out",
        address=mailbox,
        default_campaign="general",
        outbound=account.model_dump(mode="json"),
        secrets=secrets,
    )
    replies = [
        OutboundEmail(
            idempotency_key=f"reply-{uuid.uuid4()}",
            channel_id=channel.id,
            to=[Address(email="customer@example.org")],
            subject=f"Re: order {n}",
            text_body="Thank you.",
        )
        for n in range(2)
    ]

    service = Service("sender", service_env(settings), tmp_path)
    try:
        publish_replies(settings, *replies)
        smtp.wait_for(2, timeout=30)
    finally:
        service.stop()

    assert {"XOAUTH2"} == {a.mechanism for a in smtp.logins}
    assert all(a.accepted for a in smtp.logins)
    assert {mailbox} == {m.login for m in smtp.messages}
    assert catalog.secrets(channel.id)["refresh_token"] != secrets["refresh_token"]


def test_a_server_without_xoauth2_is_named_as_the_problem(dovecot: Dovecot) -> None:
    """The shared Dovecot takes passwords only: no XOAUTH2 in its CAPABILITY."""
    user = f"x{uuid.uuid4().hex[:8]}"
    dovecot.add_user(user, uuid.uuid4().hex)
    account = ImapAccount(
        host=dovecot.host,
        port=dovecot.imap_port,
        security="none",
        username=user,
        oauth2=TokenLogin(),
    )
    secrets = {"inbound_access_token": "a-token"}

    with pytest.raises(ChannelAuthError) as caught:
        ImapMailbox(
            account, StoredToken(secrets, "inbound_access_token"), timeout=10
        ).__enter__()
    report = validate_channel(
        channel_of(inbound=account),
        secrets,
        Settings(metrics_port=0),
        allow_private=True,
        step_seconds=10,
    )

    assert "does not offer AUTHENTICATE XOAUTH2" in str(caught.value)
    assert (Kind.AUTH_FAILURE, "inbound.security") == (
        report.inbound.kind,
        report.inbound.field,
    )
    assert "does not offer AUTHENTICATE XOAUTH2" in report.inbound.message


def test_an_smtp_relay_needs_no_username_but_xoauth2_does() -> None:
    relay = SmtpAccount(host="127.0.0.1", port=25, security="none")

    with pytest.raises(ValueError, match="XOAUTH2 needs the mailbox"):
        SmtpAccount(host="127.0.0.1", port=25, oauth2=TokenLogin())

    assert "" == relay.username


def test_a_bearer_is_kept_between_polls_until_its_secret_changes_elsewhere() -> None:
    bearers = Bearers(timeout=5)
    login = TokenLogin()
    stored = {"inbound_access_token": "first", "inbound_password": "unused"}

    first = bearers.get(7, "inbound", login, IMAP_SCOPES, stored)
    again = bearers.get(7, "inbound", login, IMAP_SCOPES, {**stored, "x": "y"})
    renewed = bearers.get(
        7, "inbound", login, IMAP_SCOPES, {**stored, "inbound_access_token": "second"}
    )

    assert first is again
    assert renewed is not first
    assert "second" == renewed.access_token()


# POP3


def pop3_account(server: Dovecot, user: str, oauth2: Any) -> Pop3Account:
    return Pop3Account(
        host=server.host,
        port=server.pop3s_port,
        security="tls",
        username=user,
        ca_file=str(server.pki.ca_file),
        oauth2=oauth2,
    )


def test_a_pop3_mailbox_is_read_by_xoauth2_and_a_forged_token_refused(
    fake: GraphFake, app: RegisteredApp, oauth_dovecot: Dovecot, user: str
) -> None:
    oauth_dovecot.append(user, message("by pop3"))
    account = pop3_account(oauth_dovecot, user, login(fake, app))
    bearer = source(
        fake, account.oauth2, authorise(channel_of(inbound=account), fake.pki),
        POP3_SCOPES,
    )  # fmt: skip
    forged = StoredToken({"inbound_access_token": "forged"}, "inbound_access_token")

    with Pop3Mailbox(account, bearer, timeout=10) as mailbox:
        listed = mailbox.listing()
    with pytest.raises(ChannelAuthError) as caught:
        Pop3Mailbox(
            pop3_account(oauth_dovecot, user, TokenLogin()), forged, timeout=10
        ).__enter__()

    assert 1 == len(listed)
    assert "refused the OAuth token" in str(caught.value)


def test_validate_logs_in_to_pop3_by_xoauth2(
    fake: GraphFake, app: RegisteredApp, oauth_dovecot: Dovecot, user: str
) -> None:
    inbound = pop3_account(oauth_dovecot, user, login(fake, app))
    item = channel_of(inbound=inbound)
    secrets = authorise(item, fake.pki)

    report = validate_channel(
        item, secrets, Settings(metrics_port=0), allow_private=True, step_seconds=10
    )

    assert Kind.OK == report.inbound.kind, report.inbound.message
    assert "POP3" in report.inbound.message
