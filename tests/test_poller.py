"""The poller against a real Dovecot and RabbitMQ: folders, recipients, IDLE,
UIDVALIDITY resets and how pollers share the channels."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from typing import Any

import pytest

from services.poller.worker import Poller
from services.router.worker import Router
from shared import db
from shared.catalog import Catalog, Channel
from shared.models import RawEmail, RoutedEmail
from shared.settings import Settings
from shared.topology import Topology
from tests.conftest import AMQP_URL
from tests.support.dovecot import Dovecot
from tests.support.queues import drain

Started = Callable[..., Poller]


def message(
    subject: str, to: str = "", cc: str = "", bcc: str = "", **extra: str
) -> bytes:
    mail = EmailMessage()
    mail["From"] = "customer@example.org"
    if to:
        mail["To"] = to
    if cc:
        mail["Cc"] = cc
    if bcc:
        mail["Bcc"] = bcc
    for name, value in extra.items():
        mail[name.replace("_", "-")] = value
    mail["Subject"] = subject
    mail["Message-ID"] = f"<{uuid.uuid4()}@example.org>"
    mail.set_content(f"Body of {subject}")
    return bytes(mail)


@pytest.fixture
def mailbox(dovecot: Dovecot) -> tuple[str, str]:
    user, password = f"p{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    dovecot.add_user(user, password)
    return user, password


def add_channel(
    catalog: Catalog,
    dovecot: Dovecot,
    mailbox: tuple[str, str],
    name: str = "support",
    **options: Any,
) -> Channel:
    user, password = mailbox
    if not catalog.campaigns():
        catalog.add_campaign("general", "General")
    channel = catalog.add_channel(
        name,
        address="support@example.test",
        default_campaign="general",
        inbound={
            "type": "imap",
            "host": "127.0.0.1",
            "port": dovecot.imap_port,
            "security": "none",
            "username": user,
        },
        secrets={"inbound_password": password},
        **options,
    )
    return catalog.set_active(channel.id, True)


@pytest.fixture
def start_poller(settings: Settings) -> Iterator[Started]:
    running: list[tuple[threading.Event, threading.Thread]] = []

    def start(**overrides: Any) -> Poller:
        poller = Poller(settings.model_copy(update=overrides))
        stop = threading.Event()
        thread = threading.Thread(target=poller.run, args=(stop,), daemon=True)
        thread.start()
        running.append((stop, thread))
        assert poller.ready.wait(10)
        return poller

    yield start
    for stop, thread in running:
        stop.set()
        thread.join(10)


def raw_subjects(settings: Settings, expected: int, timeout: float = 20) -> list[str]:
    queue = Topology(prefix=settings.broker_prefix).raw_queue
    taken = drain(
        AMQP_URL, [queue], until=lambda t: len(t) >= expected, timeout=timeout
    )
    subjects = []
    for item in taken:
        raw = RawEmail.model_validate_json(item.body)
        assert raw.raw.data is not None
        subject = next(
            line for line in raw.raw.data.splitlines() if line.startswith(b"Subject:")
        )
        subjects.append(subject.decode().removeprefix("Subject: "))
    return sorted(subjects)


def wait_for_poll(settings: Settings, channel_id: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.connect(settings.database_url.get_secret_value()) as conn:
            row = conn.execute(
                "SELECT last_poll_ok_at FROM channels WHERE id = %s", (channel_id,)
            ).fetchone()
        if row and row["last_poll_ok_at"]:
            return
        time.sleep(0.1)
    raise AssertionError(f"channel {channel_id} was not polled within {timeout} s")


@pytest.mark.parametrize("all_folders", [True, False])
def test_sync_all_folders_decides_whether_sub_folders_and_junk_are_read(
    catalog: Catalog,
    dovecot: Dovecot,
    mailbox: tuple[str, str],
    settings: Settings,
    start_poller: Started,
    all_folders: bool,
) -> None:
    user = mailbox[0]
    dovecot.append(user, message("in inbox"))
    dovecot.append(user, message("in sub-folder"), folder="INBOX/Orders")
    dovecot.append(user, message("in junk"), folder="Junk")
    dovecot.append(user, message("in sent"), folder="Sent")
    add_channel(catalog, dovecot, mailbox, sync_all_folders=all_folders)

    start_poller(poll_interval_seconds=60)
    expected = 3 if all_folders else 1
    subjects = raw_subjects(settings, expected, timeout=10 if all_folders else 3)

    wanted = ["in inbox", "in junk", "in sub-folder"] if all_folders else ["in inbox"]
    assert wanted == subjects


@pytest.mark.parametrize("recipient_only", [True, False])
def test_sync_when_recipient_only_keeps_mail_addressed_to_the_channel(
    catalog: Catalog,
    dovecot: Dovecot,
    mailbox: tuple[str, str],
    settings: Settings,
    start_poller: Started,
    recipient_only: bool,
) -> None:
    user = mailbox[0]
    address = "Support@Example.test"
    dovecot.append(user, message("to", to=f"Help Desk <{address}>"))
    dovecot.append(user, message("cc", to="a@example.org", cc=f"x@y.org, {address}"))
    dovecot.append(user, message("bcc", to="a@example.org", bcc=address))
    dovecot.append(
        user, message("group", to=f"Team: a@example.org, {address.lower()};")
    )
    dovecot.append(
        user, message("list", to="customers@lists.example.org", List_Id="<c.example>")
    )
    dovecot.append(
        user,
        message("forward", to="old-address@example.org", X_Forwarded_To=address),
    )
    add_channel(catalog, dovecot, mailbox, sync_recipient_only=recipient_only)

    start_poller(poll_interval_seconds=60)
    expected = 4 if recipient_only else 6
    subjects = raw_subjects(settings, expected, timeout=5)

    addressed = ["bcc", "cc", "group", "to"]
    everything = sorted([*addressed, "forward", "list"])
    assert (addressed if recipient_only else everything) == subjects
    with db.connect(settings.database_url.get_secret_value()) as conn:
        skipped = conn.execute("SELECT count(*) AS n FROM skipped_messages").fetchone()
    assert {"n": 2 if recipient_only else 0} == skipped


def test_new_mail_is_fetched_at_once_through_idle_not_on_the_interval(
    catalog: Catalog,
    dovecot: Dovecot,
    mailbox: tuple[str, str],
    settings: Settings,
    start_poller: Started,
) -> None:
    channel = add_channel(catalog, dovecot, mailbox)
    start_poller(poll_interval_seconds=300)
    wait_for_poll(settings, channel.id)
    time.sleep(1.0)  # let the watcher enter IDLE

    latencies = []
    for i in range(3):
        sent = time.monotonic()
        dovecot.append(mailbox[0], message(f"idle {i}"))
        assert [f"idle {i}"] == raw_subjects(settings, 1, timeout=15)
        latencies.append(time.monotonic() - sent)

    print(f"IDLE latency, append to RawEmail published: {latencies}")
    assert max(latencies) < 15


def test_a_uidvalidity_reset_loses_no_new_mail_and_routes_no_old_mail_again(
    catalog: Catalog,
    dovecot: Dovecot,
    mailbox: tuple[str, str],
    settings: Settings,
    start_poller: Started,
) -> None:
    user = mailbox[0]
    channel = add_channel(catalog, dovecot, mailbox)
    for i in range(5):
        dovecot.append(user, message(f"old {i}"))
    router = Router(settings)
    stop = threading.Event()
    thread = threading.Thread(target=router.run, args=(stop,), daemon=True)
    thread.start()
    assert router.ready.wait(10)
    queue = Topology(prefix=settings.broker_prefix).campaign_queue("general")
    try:
        start_poller(poll_interval_seconds=1)
        first = drain(AMQP_URL, [queue], until=lambda t: len(t) >= 5, timeout=20)

        # Dovecot renumbers a folder only while no session has it open.
        catalog.set_active(channel.id, False)
        time.sleep(2.5)
        dovecot.reset_uidvalidity(user)
        for i in range(3):
            dovecot.append(user, message(f"new {i}"))
        catalog.set_active(channel.id, True)
        second = drain(AMQP_URL, [queue], until=lambda t: len(t) >= 3, timeout=20)
        time.sleep(3)  # a second poll after the reset, and anything late
        late = drain(AMQP_URL, [queue], until=lambda _t: False, timeout=1)
    finally:
        stop.set()
        thread.join(10)

    def subjects(items: list[Any]) -> list[str]:
        return sorted(
            RoutedEmail.model_validate_json(m.body).headers.subject for m in items
        )

    assert [f"old {i}" for i in range(5)] == subjects(first)
    assert [f"new {i}" for i in range(3)] == subjects(second)
    assert [] == subjects(late)
    assert channel.id == RoutedEmail.model_validate_json(first[0].body).channel_id


def test_turning_certificate_checks_off_is_logged_for_the_channel(
    dovecot: Dovecot, mailbox: tuple[str, str]
) -> None:
    from structlog.testing import capture_logs

    from services.poller.imap import ImapMailbox
    from shared.accounts import ImapAccount

    user, password = mailbox
    account = ImapAccount(
        host="127.0.0.1",
        port=dovecot.imaps_port,
        security="tls",
        username=user,
        verify_tls=False,
    )

    with capture_logs() as logs, ImapMailbox(account, password, timeout=10) as box:
        folders = box.folders(all_folders=False)

    assert ["INBOX"] == folders
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [f"IMAP server 127.0.0.1:{dovecot.imaps_port}"] == [
        e["server"] for e in warnings if "verify_tls is false" in e["event"]
    ]
