"""The POP3 mailbox client against a real Dovecot."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from services.poller.pop3 import Pop3Mailbox
from shared.accounts import Pop3Account, Security
from shared.errors import ChannelAuthError, ChannelConnectError
from shared.models import MailSource, Protocol
from tests.support import tls
from tests.support.dovecot import Dovecot

PASSWORD = "pop goes the weasel"
TIMEOUT = 5.0
LIMIT = 1024 * 1024

Account = Callable[..., Pop3Account]


class Interrupted(Exception):
    """Something going wrong in the middle of a poll."""


def message(subject: str, body: str = "Hello.") -> bytes:
    return (
        f"From: customer@example.org\r\nTo: support@example.com\r\n"
        f"Subject: {subject}\r\nMessage-ID: <{uuid.uuid4().hex}@example.org>\r\n"
        f"\r\n{body}\r\n"
    ).encode()


def log_in(account: Pop3Account, password: str) -> None:
    with Pop3Mailbox(account, password, timeout=TIMEOUT):
        pass


@pytest.fixture
def user(dovecot: Dovecot) -> str:
    name = f"pop3-{uuid.uuid4().hex[:10]}"
    dovecot.add_user(name, PASSWORD)
    return name


@pytest.fixture
def account(dovecot: Dovecot, user: str) -> Account:
    """An account of the test's user, plain POP3 unless told otherwise."""

    def make(**changes: object) -> Pop3Account:
        settings: dict[str, object] = {
            "host": dovecot.host,
            "port": dovecot.pop3_port,
            "security": Security.NONE,
            "username": user,
        }
        settings.update(changes)
        return Pop3Account.model_validate(settings)

    return make


def test_the_listing_has_each_messages_number_uidl_and_size(
    dovecot: Dovecot, user: str, account: Account
) -> None:
    raws = [message("one"), message("two", body="longer " * 20)]
    for raw in raws:
        dovecot.append(user, raw)

    with Pop3Mailbox(account(), PASSWORD, timeout=TIMEOUT) as mailbox:
        listing = mailbox.listing()

    assert [1, 2] == [number for number, _, _ in listing]
    assert [len(raw) for raw in raws] == [size for _, _, size in listing]
    assert 2 == len({uidl for _, uidl, _ in listing})


def test_a_message_keeps_its_uidl_from_one_session_to_the_next(
    dovecot: Dovecot, user: str, account: Account
) -> None:
    dovecot.append(user, message("stable"))

    with Pop3Mailbox(account(), PASSWORD, timeout=TIMEOUT) as mailbox:
        first = mailbox.listing()
    with Pop3Mailbox(account(), PASSWORD, timeout=TIMEOUT) as mailbox:
        second = mailbox.listing()

    assert first == second


def test_a_retrieved_message_is_byte_for_byte_what_was_delivered(
    dovecot: Dovecot, user: str, account: Account
) -> None:
    # A line starting with a dot is escaped on the wire, and a line longer
    # than poplib's own limit of 2048 bytes must arrive whole too.
    raw = message("tricky", body=".hidden\r\n..two dots\r\n.\r\n" + "y" * 5000)
    dovecot.append(user, raw)

    with Pop3Mailbox(account(), PASSWORD, timeout=TIMEOUT) as mailbox:
        [(number, uidl, size)] = mailbox.listing()
        fetched = mailbox.retrieve(number, uidl, size, max_bytes=LIMIT)

    assert raw == fetched.data
    assert len(raw) == fetched.size
    assert MailSource(protocol=Protocol.POP3, uidl=uidl) == fetched.source


def test_a_message_over_the_limit_is_reported_by_size_without_its_content(
    dovecot: Dovecot, user: str, account: Account
) -> None:
    raw = message("large", body="x" * 5000)
    dovecot.append(user, raw)

    with Pop3Mailbox(account(), PASSWORD, timeout=TIMEOUT) as mailbox:
        [(number, uidl, size)] = mailbox.listing()
        fetched = mailbox.retrieve(number, uidl, size, max_bytes=1000)

    assert (None, len(raw)) == (fetched.data, fetched.size)


def test_deletions_are_committed_when_the_session_ends_normally(
    dovecot: Dovecot, user: str, account: Account
) -> None:
    for n in range(3):
        dovecot.append(user, message(f"m{n}"))

    with Pop3Mailbox(account(), PASSWORD, timeout=TIMEOUT) as mailbox:
        mailbox.delete(1)
        mailbox.delete(3)

    assert 1 == dovecot.message_count(user)


def test_deletions_are_not_committed_when_the_session_ends_by_an_exception(
    dovecot: Dovecot, user: str, account: Account
) -> None:
    dovecot.append(user, message("must survive"))

    with (
        pytest.raises(Interrupted),
        Pop3Mailbox(account(), PASSWORD, timeout=TIMEOUT) as mailbox,
    ):
        mailbox.delete(1)
        raise Interrupted

    assert 1 == dovecot.message_count(user)


def test_implicit_tls_with_the_test_ca_lists_the_mailbox(
    dovecot: Dovecot, user: str, account: Account, pki: tls.TestPki
) -> None:
    dovecot.append(user, message("over tls"))
    secure = account(
        port=dovecot.pop3s_port, security=Security.TLS, ca_file=str(pki.ca_file)
    )

    with Pop3Mailbox(secure, PASSWORD, timeout=TIMEOUT) as mailbox:
        listing = mailbox.listing()

    assert 1 == len(listing)


def test_starttls_with_the_test_ca_lists_the_mailbox(
    dovecot: Dovecot, user: str, account: Account, pki: tls.TestPki
) -> None:
    dovecot.append(user, message("after stls"))
    starttls = account(security=Security.STARTTLS, ca_file=str(pki.ca_file))

    with Pop3Mailbox(starttls, PASSWORD, timeout=TIMEOUT) as mailbox:
        listing = mailbox.listing()

    assert 1 == len(listing)


@pytest.mark.parametrize("security", [Security.TLS, Security.STARTTLS])
def test_tls_without_trusting_the_ca_fails_naming_the_certificate(
    dovecot: Dovecot, account: Account, security: Security
) -> None:
    port = dovecot.pop3s_port if security is Security.TLS else dovecot.pop3_port

    with pytest.raises(ChannelConnectError) as raised:
        log_in(account(port=port, security=security), PASSWORD)

    assert "certificate" in str(raised.value)


def test_a_wrong_password_is_an_auth_error_that_does_not_repeat_it(
    account: Account,
) -> None:
    wrong = "wrong-password-456"

    with pytest.raises(ChannelAuthError) as raised:
        log_in(account(), wrong)

    assert "refused the login" in str(raised.value)
    assert wrong not in str(raised.value)


def test_implicit_tls_on_the_plain_port_fails_as_a_tls_problem(
    account: Account, pki: tls.TestPki
) -> None:
    wrong = account(security=Security.TLS, ca_file=str(pki.ca_file))

    with pytest.raises(ChannelConnectError) as raised:
        log_in(wrong, PASSWORD)

    assert "TLS with" in str(raised.value)
