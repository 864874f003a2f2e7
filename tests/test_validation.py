"""Validate against real servers on 127.0.0.1: Dovecot, aiosmtpd, the Graph fake.

Every test reaches only 127.0.0.1: names that are not addresses go to
resolvers the tests pass in, and an audit hook stops any connection to
another address while these tests run.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from socket import AF_INET, AF_INET6
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from services.admin.oauth import authorization_url, redeem_code
from services.admin.validation import (
    Kind,
    ValidationReport,
    record_validation,
    validate_channel,
)
from shared.accounts import GraphAccount, ImapAccount, Pop3Account, Security
from shared.catalog import Catalog, Channel, ChannelStatus
from shared.settings import Settings
from tests.support.dovecot import Dovecot
from tests.support.graph_fake import GraphFake, RegisteredApp
from tests.support.smtp import Mode, SmtpServer
from tests.support.tls import TestPki, make_pki

PASSWORD = "correct horse battery"
SMTP_USER = "agent"
SMTP_PASSWORD = "s3cret smtp pass"
TENANT = "5f8c1a9e-2b7d-4c1e-9a3f-0d6e8b2c4a71"
CLIENT_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
SECRET = "Xy7~secret.value~0123456789abcdefABCDEF"
MAILBOX = "support@contoso.example"
REDIRECT = "https://mailroom.contoso.example/oauth/callback"
STEP = 5.0
# Allowance over a time bound for a loaded machine; far below the steps the
# bound tests would otherwise wait (30 s) or hang.
MARGIN = 3.0

SmtpFactory = Callable[..., SmtpServer]


@dataclass
class Network:
    """What the code under test did on the network while a test ran."""

    connects: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


_watching: list[Network] = []
LOOKUPS = frozenset({"socket.getaddrinfo", "socket.gethostbyname"})


def _watch_network(event: str, args: tuple[Any, ...]) -> None:
    """Stop any connection but to 127.0.0.1, and any use of the resolver."""
    if not _watching:
        return

    if event == "socket.connect" and args[0].family in (AF_INET, AF_INET6):
        host = str(args[1][0])
        _watching[-1].connects.append(host)
        if host != "127.0.0.1":
            raise ConnectionAbortedError(f"tests reach only 127.0.0.1, not {host}")

    if event in LOOKUPS and args[0] is not None:
        name = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        if not _is_address(name):
            _watching[-1].names.append(name)
            raise PermissionError(f"tests ask no DNS resolver, not even for {name!r}")

    if event == "socket.gethostbyaddr":
        # Asks the resolver even for an address. The Graph fake's HTTP server
        # asks for its own name when it starts (socket.getfqdn), and uses the
        # address when refused, so this is refused without failing the test.
        raise PermissionError("tests ask no DNS resolver for an address's name")


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


sys.addaudithook(_watch_network)


@pytest.fixture(autouse=True)
def network() -> Iterator[Network]:
    """The test's connections; none but to 127.0.0.1, and no name looked up."""
    seen = Network()
    _watching.append(seen)
    yield seen

    _watching.remove(seen)
    assert [] == seen.names


@pytest.fixture
def user(dovecot: Dovecot) -> str:
    name = f"val-{uuid.uuid4().hex[:10]}"
    dovecot.add_user(name, PASSWORD)
    return name


@pytest.fixture
def imap(dovecot: Dovecot, user: str, pki: TestPki) -> Callable[..., ImapAccount]:
    def make(**changes: Any) -> ImapAccount:
        settings: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": dovecot.imap_port,
            "security": Security.NONE,
            "username": user,
            "ca_file": str(pki.ca_file),
        }
        return ImapAccount(**{**settings, **changes})

    return make


@pytest.fixture
def app(graph_fake: GraphFake) -> RegisteredApp:
    graph_fake.add_mailbox(MAILBOX)
    graph_fake.signed_in_user = MAILBOX
    return graph_fake.register_app(TENANT, CLIENT_ID, SECRET, redirect_uris=(REDIRECT,))


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port of 127.0.0.1 that accepts connections and never says a word."""
    server = socket.create_server(("127.0.0.1", 0), backlog=16)
    server.settimeout(0.05)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]

    stop.set()
    thread.join(2)
    for conn in held:
        conn.close()
    server.close()


def free_port() -> int:
    """A port of 127.0.0.1 nobody listens on."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


def channel(inbound: Any = None, outbound: Any = None, **changes: Any) -> Channel:
    return Channel(
        id=7,
        name="support",
        address=MAILBOX,
        default_campaign_id=None,
        active=False,
        inbound=inbound,
        outbound=outbound,
        **changes,
    )


def settings() -> Settings:
    # Named although Settings may not know the field yet: it ignores extras.
    return Settings(metrics_port=0, validate_allow_private_addresses=False)


def validate(
    item: Channel, secrets: dict[str, str], **options: Any
) -> ValidationReport:
    """Validate with private addresses allowed, as the servers are local."""
    options.setdefault("allow_private", True)
    options.setdefault("step_seconds", STEP)
    return validate_channel(item, secrets, settings(), **options)


def verdicts(report: ValidationReport) -> tuple[Kind, Kind]:
    return report.inbound.kind, report.outbound.kind


def smtp_on(server: SmtpServer, **changes: Any) -> Any:
    return server.account(username=SMTP_USER, **changes)


def smtp_with_auth(factory: SmtpFactory, mode: Mode) -> SmtpServer:
    return factory(mode, username=SMTP_USER, password=SMTP_PASSWORD)


def secrets_for_mail() -> dict[str, str]:
    return {"inbound_password": PASSWORD, "outbound_password": SMTP_PASSWORD}


def authorise(account: GraphAccount, pki: TestPki) -> dict[str, str]:
    """The secrets of a channel an administrator has signed in for."""
    url = authorization_url(account, {"client_secret": SECRET}, state="s")
    answer = requests.get(
        url, allow_redirects=False, verify=str(pki.ca_file), timeout=10
    )
    code = parse_qs(urlsplit(answer.headers["Location"]).query)["code"][0]
    return redeem_code(account, {"client_secret": SECRET}, code)


def no_name(host: str, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


def only(address: str) -> Callable[..., list[tuple[Any, ...]]]:
    """A resolver that answers every name with ``address``."""
    calls: list[str] = []

    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        calls.append(host)
        if ":" in address:
            return [(AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))]
        return [(AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


# Working settings


@pytest.mark.parametrize(
    ("security", "port"),
    [
        (Security.NONE, "imap_port"),
        (Security.STARTTLS, "imap_port"),
        (Security.TLS, "imaps_port"),
    ],
)
def test_imap_and_smtp_that_work_pass_both_directions(
    dovecot: Dovecot,
    imap: Callable[..., ImapAccount],
    smtp_server_factory: SmtpFactory,
    security: Security,
    port: str,
) -> None:
    server = smtp_with_auth(smtp_server_factory, Mode.PLAIN)
    inbound = imap(security=security, port=getattr(dovecot, port))

    report = validate(channel(inbound, smtp_on(server)), secrets_for_mail())

    assert (Kind.OK, Kind.OK) == verdicts(report)
    assert report.ok
    assert "opened folder 'INBOX'" in report.inbound.message
    assert [] == server.messages


@pytest.mark.parametrize(
    ("security", "port"),
    [(Security.STARTTLS, "pop3_port"), (Security.TLS, "pop3s_port")],
)
def test_pop3_that_works_passes(
    dovecot: Dovecot, user: str, pki: TestPki, security: Security, port: str
) -> None:
    inbound = Pop3Account(
        host="127.0.0.1",
        port=getattr(dovecot, port),
        security=security,
        username=user,
        ca_file=str(pki.ca_file),
    )

    report = validate(channel(inbound), {"inbound_password": PASSWORD})

    assert (Kind.OK, Kind.NOT_CONFIGURED) == verdicts(report)
    assert report.ok


@pytest.mark.parametrize("mode", [Mode.PLAIN, Mode.STARTTLS, Mode.TLS])
def test_smtp_that_works_passes_after_auth_and_sends_nothing(
    imap: Callable[..., ImapAccount], smtp_server_factory: SmtpFactory, mode: Mode
) -> None:
    server = smtp_with_auth(smtp_server_factory, mode)

    report = validate(channel(imap(), smtp_on(server)), secrets_for_mail())

    assert Kind.OK == report.outbound.kind
    assert [(SMTP_USER, True)] == [(a.username, a.accepted) for a in server.logins]
    assert [] == server.messages


def test_graph_that_works_passes_both_directions(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    account = graph_fake.account(app, MAILBOX)

    report = validate(channel(account, account), {"client_secret": SECRET})

    assert (Kind.OK, Kind.OK) == verdicts(report), report.message
    assert "Inbox" in report.inbound.message
    assert [] == graph_fake.sent


def test_a_delegated_graph_channel_passes_and_keeps_the_rotated_refresh_token(
    graph_fake: GraphFake, app: RegisteredApp, pki: TestPki, catalog: Catalog
) -> None:
    account = graph_fake.account(
        app, MAILBOX, auth_flow="authorization_code", redirect_uri=REDIRECT
    )
    secrets = authorise(account, pki)
    stored = catalog.add_channel(
        "graph",
        inbound=account.model_dump(mode="json"),
        outbound=account.model_dump(mode="json"),
        secrets=secrets,
    )

    report = validate(stored, secrets)
    recorded = record_validation(catalog.conn, stored.id, report, box=catalog.box)
    again = validate(recorded, catalog.secrets(stored.id))

    assert (Kind.OK, Kind.OK) == verdicts(report), report.message
    assert secrets["refresh_token"] != catalog.secrets(stored.id)["refresh_token"]
    assert ChannelStatus.ACTIVE == recorded.status
    assert (Kind.OK, Kind.OK) == verdicts(again), again.message


# What each failure says


def test_a_host_name_that_does_not_resolve_is_a_dns_failure_of_the_host(
    imap: Callable[..., ImapAccount],
) -> None:
    inbound = imap(host="imap.mailroom.invalid")

    report = validate(channel(inbound), secrets_for_mail(), resolve=no_name)

    assert Kind.DNS_FAILURE == report.inbound.kind
    assert "inbound.host" == report.inbound.field
    assert "'imap.mailroom.invalid'" in report.inbound.message
    assert "Name or service not known" in report.inbound.message


def test_a_port_nobody_listens_on_is_a_refused_connection(
    imap: Callable[..., ImapAccount], smtp_server_factory: SmtpFactory
) -> None:
    server = smtp_with_auth(smtp_server_factory, Mode.PLAIN)
    outbound = smtp_on(server, port=free_port())

    report = validate(channel(imap(), outbound), secrets_for_mail())

    assert (Kind.OK, Kind.CONNECTION_REFUSED) == verdicts(report)
    assert "outbound.port" == report.outbound.field


def test_servers_that_never_answer_time_out_within_the_step_timeout(
    imap: Callable[..., ImapAccount],
    smtp_server_factory: SmtpFactory,
    silent_port: int,
) -> None:
    server = smtp_with_auth(smtp_server_factory, Mode.PLAIN)
    silent = channel(imap(port=silent_port), smtp_on(server, port=silent_port))

    started = time.monotonic()
    report = validate(silent, secrets_for_mail(), step_seconds=0.5)
    elapsed = time.monotonic() - started

    assert (Kind.TIMEOUT, Kind.TIMEOUT) == verdicts(report)
    assert "did not answer within 0.5 s" in report.inbound.message
    assert elapsed < 0.5 + MARGIN


def test_the_whole_validation_ends_at_its_deadline_however_long_a_step_may_be(
    imap: Callable[..., ImapAccount], silent_port: int
) -> None:
    silent = channel(imap(port=silent_port, security=Security.TLS))

    started = time.monotonic()
    report = validate(silent, secrets_for_mail(), step_seconds=30.0, total_seconds=1.5)
    elapsed = time.monotonic() - started

    assert Kind.TIMEOUT == report.inbound.kind
    assert elapsed < 1.5 + MARGIN


def test_a_certificate_from_a_ca_the_channel_does_not_trust_is_named(
    dovecot: Dovecot, imap: Callable[..., ImapAccount]
) -> None:
    inbound = imap(port=dovecot.imaps_port, security=Security.TLS, ca_file=None)

    report = validate(channel(inbound), secrets_for_mail())

    assert Kind.TLS_FAILURE == report.inbound.kind
    assert "inbound.ca_file" == report.inbound.field
    assert (
        "certificate verify failed: unable to get local issuer certificate"
        in report.inbound.message
    )


def test_a_certificate_for_another_host_name_is_named_as_such(
    imap: Callable[..., ImapAccount], smtp_server_factory: SmtpFactory, tmp_path: Path
) -> None:
    elsewhere = make_pki(tmp_path, "mail.example.org")
    server = smtp_server_factory(
        Mode.TLS, pki=elsewhere, username=SMTP_USER, password=SMTP_PASSWORD
    )

    report = validate(channel(imap(), smtp_on(server)), secrets_for_mail())

    assert Kind.TLS_FAILURE == report.outbound.kind
    assert "outbound.host" == report.outbound.field
    assert "mismatch, certificate is not valid for '127.0.0.1'" in (
        report.outbound.message
    )


def test_wrong_passwords_are_authentication_failures_of_each_protocol(
    dovecot: Dovecot,
    user: str,
    imap: Callable[..., ImapAccount],
    smtp_server_factory: SmtpFactory,
) -> None:
    server = smtp_with_auth(smtp_server_factory, Mode.STARTTLS)
    pop3 = Pop3Account(
        host="127.0.0.1", port=dovecot.pop3_port, security="none", username=user
    )
    wrong = {"inbound_password": "wrong one", "outbound_password": "wrong two"}

    by_imap = validate(channel(imap(), smtp_on(server)), wrong)
    by_pop3 = validate(channel(pop3), wrong)

    assert (Kind.AUTH_FAILURE, Kind.AUTH_FAILURE) == verdicts(by_imap)
    assert Kind.AUTH_FAILURE == by_pop3.inbound.kind
    assert ("inbound.password", "outbound.password", "inbound.password") == (
        by_imap.inbound.field,
        by_imap.outbound.field,
        by_pop3.inbound.field,
    )
    assert f"refused the login for {user!r}" in by_imap.inbound.message
    assert "check the channel's inbound username and password" in (
        by_imap.inbound.message
    )
    for report in (by_imap, by_pop3):
        assert "wrong one" not in report.model_dump_json()
        assert "wrong two" not in report.model_dump_json()


def test_a_folder_the_mailbox_does_not_have_is_named(
    imap: Callable[..., ImapAccount],
) -> None:
    report = validate(channel(imap(folder="INBOX/Orders")), secrets_for_mail())

    assert Kind.FOLDER_MISSING == report.inbound.kind
    assert "inbound.folder" == report.inbound.field
    assert "no folder 'INBOX/Orders'" in report.inbound.message


def test_a_wrong_client_secret_is_a_token_error_of_the_secret(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    account = graph_fake.account(app, MAILBOX)

    report = validate(channel(account), {"client_secret": "not the secret"})

    assert Kind.GRAPH_TOKEN_ERROR == report.inbound.kind
    assert "client_secret" == report.inbound.field
    assert "(AADSTS7000215)" in report.inbound.message
    assert "not the secret" not in report.model_dump_json()


def test_an_unknown_tenant_is_a_token_error_of_the_tenant_id(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    account = graph_fake.account(app, MAILBOX).model_copy(
        update={"tenant_id": "contoso.onmicrosoft.example"}
    )

    report = validate(channel(account), {"client_secret": SECRET})

    assert Kind.GRAPH_TOKEN_ERROR == report.inbound.kind
    assert "inbound.tenant_id" == report.inbound.field
    assert "(AADSTS90002)" in report.inbound.message


@pytest.mark.parametrize(
    ("padded", "field"),
    [
        ({"tenant_id": f" {TENANT}"}, "inbound.tenant_id"),
        ({"client_id": f"{CLIENT_ID}\t"}, "inbound.client_id"),
        ({}, "client_secret"),
    ],
)
def test_white_space_around_an_id_or_secret_is_named_before_any_request(
    graph_fake: GraphFake, app: RegisteredApp, padded: dict[str, str], field: str
) -> None:
    account = graph_fake.account(app, MAILBOX).model_copy(update=padded)
    secret = SECRET if padded else f"{SECRET} "
    resolver = only("127.0.0.1")

    report = validate(channel(account), {"client_secret": secret}, resolve=resolver)

    assert Kind.BAD_SETTING == report.inbound.kind
    assert field == report.inbound.field
    assert "white space at its start or end" in report.inbound.message
    assert [] == resolver.calls  # type: ignore[attr-defined]
    assert [] == graph_fake.requests


def test_an_app_without_mail_permission_is_told_which_permission_it_misses(
    graph_fake: GraphFake,
) -> None:
    graph_fake.add_mailbox(MAILBOX)
    app = graph_fake.register_app(TENANT, CLIENT_ID, SECRET, permissions=("Mail.Send",))
    account = graph_fake.account(app, MAILBOX)

    report = validate(channel(account, account), {"client_secret": SECRET})

    assert (Kind.GRAPH_PERMISSION_MISSING, Kind.GRAPH_PERMISSION_MISSING) == (
        verdicts(report)
    )
    assert "ErrorAccessDenied" in report.inbound.message
    assert "Mail.ReadWrite" in report.inbound.message


# Where a validation may connect


def test_a_loopback_server_is_refused_unless_private_addresses_are_allowed(
    dovecot: Dovecot,
    imap: Callable[..., ImapAccount],
    graph_fake: GraphFake,
    app: RegisteredApp,
    network: Network,
) -> None:
    graph = graph_fake.account(app, MAILBOX)
    secrets = {**secrets_for_mail(), "client_secret": SECRET}

    report = validate(channel(imap(), graph), secrets, allow_private=None)

    assert (Kind.ADDRESS_NOT_ALLOWED, Kind.ADDRESS_NOT_ALLOWED) == verdicts(report)
    assert "inbound.host" == report.inbound.field
    assert "outbound.authority_host" == report.outbound.field
    assert "127.0.0.1, a loopback address" in report.inbound.message
    assert [] == network.connects
    assert [] == graph_fake.requests


def test_a_name_that_resolves_to_the_metadata_address_is_never_connected_to(
    imap: Callable[..., ImapAccount], network: Network
) -> None:
    inbound = imap(host="mail.contoso.example")

    report = validate(
        channel(inbound), secrets_for_mail(), resolve=only("169.254.169.254")
    )

    assert Kind.ADDRESS_NOT_ALLOWED == report.inbound.kind
    assert "169.254.169.254, a cloud metadata address" in report.inbound.message
    assert [] == network.connects


@pytest.mark.parametrize(
    ("address", "what"),
    [
        ("10.20.30.40", "a private address"),
        ("172.16.0.9", "a private address"),
        ("192.168.1.1", "a private address"),
        ("fd12:3456::1", "a private address"),
        ("169.254.10.10", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("::ffff:127.0.0.1", "a loopback address"),
        ("0.0.0.0", "an address of this host"),  # noqa: S104 - refused, not bound
    ],
)
def test_private_and_link_local_addresses_are_refused_by_default(
    imap: Callable[..., ImapAccount], network: Network, address: str, what: str
) -> None:
    inbound = imap(host="mail.contoso.example")

    report = validate(
        channel(inbound), secrets_for_mail(), resolve=only(address), allow_private=None
    )

    assert Kind.ADDRESS_NOT_ALLOWED == report.inbound.kind
    assert f", {what}," in report.inbound.message
    assert [] == network.connects


def test_the_metadata_address_is_refused_even_where_private_ones_are_allowed(
    imap: Callable[..., ImapAccount], network: Network
) -> None:
    inbound = imap(host="mail.contoso.example")

    report = validate(
        channel(inbound), secrets_for_mail(), resolve=only("fd00:ec2::254")
    )

    assert Kind.ADDRESS_NOT_ALLOWED == report.inbound.kind
    assert "fd00:ec2::254, a cloud metadata address" in report.inbound.message
    assert [] == network.connects


# Reporting and recording


def test_a_channel_without_outbound_passes_on_its_inbound_alone(
    imap: Callable[..., ImapAccount],
) -> None:
    report = validate(channel(imap()), secrets_for_mail())

    assert report.ok
    assert ["inbound  OK      ok", "outbound SKIPPED not_configured"] == [
        line.split(":")[0] for line in report.lines()
    ]


def test_a_channel_without_inbound_fails_as_not_configured() -> None:
    report = validate(channel(), {})

    assert (Kind.NOT_CONFIGURED, False) == (report.inbound.kind, report.ok)
    assert report.lines()[0].startswith("inbound  FAILED  not_configured: ")


def test_a_recorded_validation_sets_the_channel_status_and_holds_no_secret(
    dovecot: Dovecot, user: str, catalog: Catalog
) -> None:
    added = catalog.add_channel(
        "support",
        address=MAILBOX,
        inbound={
            "type": "imap",
            "host": "127.0.0.1",
            "port": dovecot.imap_port,
            "security": "none",
            "username": user,
        },
        secrets={"inbound_password": PASSWORD},
    )
    failing = catalog.add_channel(
        "sales",
        inbound={**added.model_dump(mode="json")["inbound"], "folder": "Nope"},
        secrets={"inbound_password": PASSWORD},
    )

    passed = record_validation(
        catalog.conn, added.id, validate(added, catalog.secrets(added.id))
    )
    failed = record_validation(
        catalog.conn, failing.id, validate(failing, catalog.secrets(failing.id))
    )

    assert ChannelStatus.ACTIVE == passed.status
    assert ChannelStatus.INACTIVE == failed.status
    assert passed.last_validated_at is not None
    assert "folder_missing" == (failed.validation or {})["inbound"]["kind"]
    assert "no folder 'Nope'" in failed.status_detail
    assert PASSWORD not in json.dumps([passed.validation, failed.validation])
