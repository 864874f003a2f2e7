"""The IMAP mailbox client against a real Dovecot."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Iterator

import pytest
from imapclient import IMAPClient

from services.poller import imap
from services.poller.fetched import Fetched
from services.poller.imap import ImapMailbox
from shared.accounts import ImapAccount, Security
from shared.checkpoints import Checkpoint
from shared.errors import ChannelAuthError, ChannelConnectError, ChannelProtocolError
from shared.models import Protocol
from tests.support import tls
from tests.support.dovecot import Dovecot

PASSWORD = "correct horse battery"
TIMEOUT = 5.0
LIMIT = 1024 * 1024

Account = Callable[..., ImapAccount]


def message(subject: str, body: str = "Hello.") -> bytes:
    return (
        f"From: customer@example.org\r\nTo: support@example.com\r\n"
        f"Subject: {subject}\r\nMessage-ID: <{uuid.uuid4().hex}@example.org>\r\n"
        f"\r\n{body}\r\n"
    ).encode()


def fetch_all(
    mailbox: ImapMailbox,
    checkpoint: Checkpoint | None,
    folder: str = "INBOX",
    *,
    batch: int = 100,
    max_bytes: int = LIMIT,
) -> tuple[list[Fetched], Checkpoint | None]:
    """Every batch of one poll, and the checkpoint the last batch gave."""
    fetched: list[Fetched] = []
    last = checkpoint
    for found, last in mailbox.fetch_new(  # noqa: B007
        folder, checkpoint, batch=batch, max_bytes=max_bytes
    ):
        fetched.extend(found)
    return fetched, last


def subjects(fetched: list[Fetched]) -> list[str]:
    return [
        line.split(": ", 1)[1]
        for item in fetched
        for line in (item.data or b"").decode().split("\r\n")
        if line.startswith("Subject: ")
    ]


def log_in(account: ImapAccount, password: str, *, timeout: float) -> None:
    with ImapMailbox(account, password, timeout=timeout):
        pass


@pytest.fixture
def user(dovecot: Dovecot) -> str:
    name = f"imap-{uuid.uuid4().hex[:10]}"
    dovecot.add_user(name, PASSWORD)
    return name


@pytest.fixture
def account(dovecot: Dovecot, user: str) -> Account:
    """An account of the test's user, plain IMAP unless told otherwise."""

    def make(**changes: object) -> ImapAccount:
        settings: dict[str, object] = {
            "host": dovecot.host,
            "port": dovecot.imap_port,
            "security": Security.NONE,
            "username": user,
        }
        settings.update(changes)
        return ImapAccount.model_validate(settings)

    return make


@pytest.fixture
def mailbox(account: Account) -> Iterator[ImapMailbox]:
    with ImapMailbox(account(), PASSWORD, timeout=TIMEOUT) as opened:
        yield opened


def test_a_new_message_is_fetched_whole_with_where_it_came_from(
    dovecot: Dovecot, user: str, mailbox: ImapMailbox
) -> None:
    raw = message("Order 1")
    uid = dovecot.append(user, raw)

    fetched, checkpoint = fetch_all(mailbox, None)

    uidvalidity = dovecot.uidvalidity(user)
    assert [raw] == [item.data for item in fetched]
    assert [len(raw)] == [item.size for item in fetched]
    source = fetched[0].source
    assert (Protocol.IMAP, "INBOX", uidvalidity, uid) == (
        source.protocol,
        source.folder,
        source.uidvalidity,
        source.uid,
    )
    assert Checkpoint("INBOX", uidvalidity, uid) == checkpoint


def test_polls_with_checkpoints_fetch_nothing_twice_and_miss_nothing(
    dovecot: Dovecot, user: str, mailbox: ImapMailbox
) -> None:
    for n in range(3):
        dovecot.append(user, message(f"first {n}"))
    first, checkpoint = fetch_all(mailbox, None)
    for n in range(2):
        dovecot.append(user, message(f"second {n}"))

    second, checkpoint = fetch_all(mailbox, checkpoint)
    third, _ = fetch_all(mailbox, checkpoint)

    assert ["first 0", "first 1", "first 2"] == subjects(first)
    assert ["second 0", "second 1"] == subjects(second)
    assert [] == third


def test_a_checkpoint_at_the_highest_uid_fetches_nothing(
    dovecot: Dovecot, user: str, mailbox: ImapMailbox
) -> None:
    uid = dovecot.append(user, message("the only one"))
    checkpoint = Checkpoint("INBOX", dovecot.uidvalidity(user), uid)

    fetched, _ = fetch_all(mailbox, checkpoint)

    assert [] == fetched


def test_a_server_without_uidnext_still_fetches_nothing_at_the_top(
    dovecot: Dovecot,
    user: str,
    mailbox: ImapMailbox,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # "UID n:*" names the last message even when n is above every UID.
    examine = IMAPClient.select_folder

    def without_uidnext(
        client: IMAPClient, folder: str, readonly: bool = False
    ) -> dict[bytes, object]:
        status = examine(client, folder, readonly)
        status.pop(b"UIDNEXT", None)
        return status

    monkeypatch.setattr(IMAPClient, "select_folder", without_uidnext)
    first = dovecot.append(user, message("old"))
    checkpoint = Checkpoint("INBOX", dovecot.uidvalidity(user), first)

    at_top, unchanged = fetch_all(mailbox, checkpoint)
    dovecot.append(user, message("new"))
    after_one_more, _ = fetch_all(mailbox, unchanged)

    assert [] == at_top
    assert ["new"] == subjects(after_one_more)


def test_messages_come_in_batches_each_with_a_checkpoint_at_its_last_uid(
    dovecot: Dovecot, user: str, mailbox: ImapMailbox
) -> None:
    uids = [dovecot.append(user, message(f"m{n}")) for n in range(5)]

    batches = list(mailbox.fetch_new("INBOX", None, batch=2, max_bytes=LIMIT))

    assert [2, 2, 1] == [len(found) for found, _ in batches]
    assert [uids[1], uids[3], uids[4]] == [cp.last_uid for _, cp in batches]


def test_a_large_folder_is_searched_in_spans_without_losing_a_message(
    dovecot: Dovecot,
    user: str,
    mailbox: ImapMailbox,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(imap, "SEARCH_SPAN", 2)
    for n in range(5):
        dovecot.append(user, message(f"m{n}"))

    fetched, _ = fetch_all(mailbox, None, batch=3)

    assert ["m0", "m1", "m2", "m3", "m4"] == subjects(fetched)


def test_fetching_leaves_messages_unseen(
    dovecot: Dovecot, user: str, mailbox: ImapMailbox
) -> None:
    uid = dovecot.append(user, message("unread"))

    fetched, _ = fetch_all(mailbox, None)

    with dovecot.client(user) as client:
        client.select_folder("INBOX", readonly=True)
        flags = client.get_flags([uid])[uid]
    assert 1 == len(fetched)
    assert set() == set(flags) - {b"\\Recent"}


def test_a_message_over_the_limit_is_reported_by_size_without_its_content(
    dovecot: Dovecot, user: str, mailbox: ImapMailbox
) -> None:
    small = message("small")
    large = message("large", body="x" * 5000)
    dovecot.append(user, small)
    dovecot.append(user, large)

    fetched, _ = fetch_all(mailbox, None, max_bytes=len(small))

    assert [(small, len(small)), (None, len(large))] == [
        (item.data, item.size) for item in fetched
    ]


def test_without_all_folders_only_the_accounts_folder_is_polled(
    dovecot: Dovecot, user: str, account: Account
) -> None:
    dovecot.append(user, message("elsewhere"), folder="Orders")

    with ImapMailbox(account(folder="Orders"), PASSWORD, timeout=TIMEOUT) as box:
        folders = box.folders(all_folders=False)

    assert ["Orders"] == folders


def test_all_folders_are_inbox_sub_folders_and_junk_but_not_sent_drafts_or_trash(
    dovecot: Dovecot, user: str, mailbox: ImapMailbox
) -> None:
    dovecot.append(user, message("urgent"), folder="Support/Urgent")
    dovecot.append(user, message("spam?"), folder="Junk")
    dovecot.append(user, message("our reply"), folder="Sent")

    folders = mailbox.folders(all_folders=True)

    assert ["INBOX", "Junk", "Support/Urgent"] == [folders[0], *sorted(folders[1:])]


def test_a_sub_folder_is_fetched_under_its_own_name(
    dovecot: Dovecot, user: str, mailbox: ImapMailbox
) -> None:
    dovecot.append(user, message("urgent"), folder="Support/Urgent")

    fetched, checkpoint = fetch_all(mailbox, None, folder="Support/Urgent")

    assert ["urgent"] == subjects(fetched)
    assert ["Support/Urgent"] == [item.source.folder for item in fetched]
    assert checkpoint is not None
    assert "Support/Urgent" == checkpoint.folder


def test_a_new_uidvalidity_makes_the_folder_be_read_again_from_uid_1(
    dovecot: Dovecot, user: str, account: Account
) -> None:
    for n in range(2):
        dovecot.append(user, message(f"m{n}"))
    with ImapMailbox(account(), PASSWORD, timeout=TIMEOUT) as box:
        _, checkpoint = fetch_all(box, None)

    uidvalidity = dovecot.reset_uidvalidity(user)
    with ImapMailbox(account(), PASSWORD, timeout=TIMEOUT) as box:
        fetched, after = fetch_all(box, checkpoint)

    assert checkpoint is not None
    assert uidvalidity != checkpoint.uidvalidity
    assert ["m0", "m1"] == subjects(fetched)
    assert [(uidvalidity, 1), (uidvalidity, 2)] == [
        (item.source.uidvalidity, item.source.uid) for item in fetched
    ]
    assert Checkpoint("INBOX", uidvalidity, 2) == after


def test_a_missing_folder_is_a_protocol_error_naming_it(
    mailbox: ImapMailbox,
) -> None:
    with pytest.raises(ChannelProtocolError) as raised:
        fetch_all(mailbox, None, folder="No/Such/Folder")

    assert "'No/Such/Folder'" in str(raised.value)


def test_a_checkpoint_of_another_folder_is_refused(mailbox: ImapMailbox) -> None:
    with pytest.raises(ValueError) as raised:
        fetch_all(mailbox, Checkpoint("Junk", 1, 1))

    assert "Junk" in str(raised.value)


def test_implicit_tls_with_the_test_ca_fetches_mail(
    dovecot: Dovecot, user: str, account: Account, pki: tls.TestPki
) -> None:
    dovecot.append(user, message("over tls"))
    tls = account(
        port=dovecot.imaps_port, security=Security.TLS, ca_file=str(pki.ca_file)
    )

    with ImapMailbox(tls, PASSWORD, timeout=TIMEOUT) as box:
        fetched, _ = fetch_all(box, None)

    assert ["over tls"] == subjects(fetched)


def test_starttls_with_the_test_ca_fetches_mail(
    dovecot: Dovecot, user: str, account: Account, pki: tls.TestPki
) -> None:
    dovecot.append(user, message("after starttls"))
    starttls = account(security=Security.STARTTLS, ca_file=str(pki.ca_file))

    with ImapMailbox(starttls, PASSWORD, timeout=TIMEOUT) as box:
        fetched, _ = fetch_all(box, None)

    assert ["after starttls"] == subjects(fetched)


@pytest.mark.parametrize("security", [Security.TLS, Security.STARTTLS])
def test_tls_without_trusting_the_ca_fails_naming_the_certificate(
    dovecot: Dovecot, account: Account, security: Security
) -> None:
    port = dovecot.imaps_port if security is Security.TLS else dovecot.imap_port
    untrusted = account(port=port, security=security)

    with pytest.raises(ChannelConnectError) as raised:
        log_in(untrusted, PASSWORD, timeout=TIMEOUT)

    assert "certificate" in str(raised.value)


def test_tls_without_verification_accepts_an_unknown_ca(
    dovecot: Dovecot, account: Account
) -> None:
    unverified = account(
        port=dovecot.imaps_port, security=Security.TLS, verify_tls=False
    )

    with ImapMailbox(unverified, PASSWORD, timeout=TIMEOUT) as box:
        folders = box.folders(all_folders=False)

    assert ["INBOX"] == folders


def test_implicit_tls_on_the_plain_port_fails_as_a_tls_problem(
    dovecot: Dovecot, account: Account, pki: tls.TestPki
) -> None:
    wrong = account(security=Security.TLS, ca_file=str(pki.ca_file))

    with pytest.raises(ChannelConnectError) as raised:
        log_in(wrong, PASSWORD, timeout=TIMEOUT)

    assert "TLS with" in str(raised.value)


def test_a_wrong_password_is_an_auth_error_that_does_not_repeat_it(
    account: Account,
) -> None:
    wrong = "wrong-password-123"

    with pytest.raises(ChannelAuthError) as raised:
        log_in(account(), wrong, timeout=TIMEOUT)

    assert "refused the login" in str(raised.value)
    assert wrong not in str(raised.value)


def test_a_refused_connection_is_a_connect_error(account: Account) -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        closed_port = placeholder.getsockname()[1]

    with pytest.raises(ChannelConnectError) as raised:
        log_in(account(port=closed_port), PASSWORD, timeout=TIMEOUT)

    assert "refused the connection" in str(raised.value)


def test_a_server_that_never_answers_is_a_connect_error_after_the_timeout(
    account: Account,
) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]

        with pytest.raises(ChannelConnectError) as raised:
            log_in(account(port=port), PASSWORD, timeout=0.2)

    assert "did not answer within 0.2 s" in str(raised.value)


def test_a_host_name_that_does_not_resolve_is_a_connect_error(
    account: Account,
) -> None:
    nowhere = account(host="mail.mailroom-test.invalid")

    with pytest.raises(ChannelConnectError) as raised:
        log_in(nowhere, PASSWORD, timeout=TIMEOUT)

    assert "could not be resolved" in str(raised.value)


def test_the_password_is_not_in_the_mailboxs_repr(account: Account) -> None:
    mailbox = ImapMailbox(account(), PASSWORD, timeout=TIMEOUT)

    assert PASSWORD not in repr(mailbox)
