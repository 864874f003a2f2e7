"""The per-sender rate guard: mail loops flagged, nothing held back.

Router processes, as an operator runs them, with a limit of three messages
per sender and window. RawEmails are published with the fetch time chosen,
so which window each message falls in does not depend on the clock.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared import broker
from shared.broker import Outgoing, Publisher
from shared.catalog import Catalog
from shared.models import (
    Address,
    DeliveryState,
    Flag,
    MailSource,
    OutboundEmail,
    Payload,
    Protocol,
    RawEmail,
    RoutedEmail,
)
from shared.settings import Settings
from shared.topology import RAW_KEY, Topology
from tests.conftest import AMQP_URL
from tests.support.outbound import publish_replies, statuses
from tests.support.processes import Service, free_port, service_env
from tests.support.queues import drain
from tests.support.smtp import SmtpServer

LIMIT = 3
WINDOW = 600
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

Start = Callable[..., Service]


def mail(sender: str | None, subject: str) -> bytes:
    head = f"From: {sender}\r\n" if sender else "From: undisclosed-senders:;\r\n"
    return (
        f"{head}To: support@example.test\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@loop.example>\r\n"
        "Auto-Submitted: auto-replied\r\n\r\n"
        "I am out of the office.\r\n"
    ).encode()


def window(offset: int = 0) -> datetime:
    """A time inside the current window, or ``offset`` windows later."""
    start = int(time.time()) // WINDOW * WINDOW
    return datetime.fromtimestamp(start, UTC) + timedelta(seconds=WINDOW * offset + 5)


@pytest.fixture
def channel_id(catalog: Catalog) -> int:
    catalog.add_campaign("general", "General")
    return catalog.add_channel("support", default_campaign="general").id


@pytest.fixture
def start_router(settings: Settings) -> Iterator[Start]:
    ARTIFACTS.mkdir(exist_ok=True)
    started: list[Service] = []

    def start(**extra: str) -> Service:
        env = service_env(
            settings,
            MAILROOM_LOOP_SENDER_LIMIT=str(LIMIT),
            MAILROOM_LOOP_WINDOW_SECONDS=str(WINDOW),
            **extra,
        )
        service = Service("router", env, ARTIFACTS, metrics_port=free_port())
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


def publish(
    settings: Settings, channel_id: int, mails: list[bytes], at: datetime
) -> None:
    topology = Topology(prefix=settings.broker_prefix)
    outgoing = []
    for data in mails:
        raw = RawEmail(
            channel_id=channel_id,
            source=MailSource(protocol=Protocol.POP3, uidl=uuid.uuid4().hex),
            fetched_at=at,
            raw=Payload.of(data),
        )
        outgoing.append(
            Outgoing(topology.raw_exchange, RAW_KEY, raw.to_json(), str(raw.id))
        )

    connection = broker.connect(AMQP_URL, attempts=3)
    try:
        channel = connection.channel()
        topology.declare(channel)
        topology.declare_campaign(channel, "general")
        Publisher(connection).publish_all(outgoing)
    finally:
        connection.release()


def routed(settings: Settings, count: int) -> list[RoutedEmail]:
    queue = Topology(prefix=settings.broker_prefix).campaign_queue("general")
    got = drain(AMQP_URL, [queue], until=lambda t: len(t) >= count, timeout=30)
    return [RoutedEmail.model_validate_json(m.body) for m in got]


def flagged(emails: list[RoutedEmail]) -> list[str]:
    return [e.headers.subject for e in emails if Flag.LOOP_SUSPECTED in e.flags]


def wait_ready(service: Service) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert service.alive(), service.text()[-2000:]
        try:
            if 200 == service.get("/readyz")[0]:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"router not ready: {service.text()[-2000:]}")


def routed_lines(service: Service) -> list[dict[str, Any]]:
    return [line for line in service.lines() if line.get("outcome") == "routed"]


def eventually(read: Callable[[], list[Any]], count: int) -> list[Any]:
    """What ``read`` gives once it has ``count`` items: log lines come last."""
    deadline = time.monotonic() + 10
    items = read()
    while len(items) < count and time.monotonic() < deadline:
        time.sleep(0.1)
        items = read()
    return items


def loop_counter(service: Service) -> float:
    _status, text = service.get("/metrics")
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "mailroom_loop_suspected_messages_total"
    )


def test_mail_past_the_limit_from_one_sender_is_flagged_and_still_routed(
    settings: Settings, channel_id: int, start_router: Start
) -> None:
    router = start_router()
    senders = ["Auto <auto@loop.example>", "AUTO@Loop.Example", "auto@loop.example"]
    mails = []
    for i in range(1, 6):
        mails.append(mail(senders[i % 3], f"loop {i}"))
        mails.append(mail(None, f"nobody {i}"))
        if i <= LIMIT:
            mails.append(mail("customer@customer.example", f"other {i}"))
    publish(settings, channel_id, mails, window())

    emails = routed(settings, len(mails))
    logged = eventually(lambda: routed_lines(router), len(mails))

    assert len(mails) == len(emails)
    assert ["loop 4", "loop 5"] == flagged(emails)
    by_raw = {str(e.raw_email_id): Flag.LOOP_SUSPECTED in e.flags for e in emails}
    assert by_raw == {line["message_id"]: line["loop_suspected"] for line in logged}
    assert 2 == loop_counter(router)


def test_duplicates_the_router_drops_are_not_counted(
    settings: Settings, channel_id: int, start_router: Start
) -> None:
    start_router()
    first = mail("auto@loop.example", "loop 1")
    rest = [mail("auto@loop.example", f"loop {i}") for i in (2, 3, 4)]
    publish(settings, channel_id, [first, first, first], window())
    routed(settings, 1)

    publish(settings, channel_id, [first, *rest], window())
    emails = routed(settings, 3)

    assert ["loop 2", "loop 3", "loop 4"] == [e.headers.subject for e in emails]
    assert ["loop 4"] == flagged(emails)


def test_two_routers_count_one_sender_together(
    settings: Settings, channel_id: int, start_router: Start
) -> None:
    routers = [start_router(MAILROOM_PREFETCH="1") for _ in range(2)]
    for router in routers:
        wait_ready(router)
    mails = [mail("auto@loop.example", f"loop {i}") for i in range(1, 13)]
    publish(settings, channel_id, mails, window())

    emails = routed(settings, len(mails))

    assert len(mails) == len(emails)
    assert len(mails) - LIMIT == len(flagged(emails))
    eventually(lambda: [x for r in routers for x in routed_lines(r)], len(mails))
    handled = [len(routed_lines(r)) for r in routers]
    assert 0 not in handled, handled
    assert len(mails) - LIMIT == sum(loop_counter(r) for r in routers)


def test_mail_in_a_later_window_starts_a_new_count(
    settings: Settings, channel_id: int, start_router: Start
) -> None:
    start_router()
    now = [mail("auto@loop.example", f"now {i}") for i in range(1, 5)]
    later = [mail("auto@loop.example", f"later {i}") for i in range(1, 4)]
    publish(settings, channel_id, now, window())
    first = routed(settings, len(now))

    publish(settings, channel_id, later, window(1))
    second = routed(settings, len(later))

    assert ["now 4"] == flagged(first)
    assert [] == flagged(second)


# --- the sender's half: no automatic reply to a looping sender ---------------


def test_an_automatic_reply_to_a_looping_sender_is_held_back(
    catalog: Catalog,
    settings: Settings,
    smtp_server_factory: Callable[..., SmtpServer],
    tmp_path: Path,
) -> None:
    smtp = smtp_server_factory("plain")
    channel = catalog.add_channel(
        "support",
        address="support@example.test",
        outbound=smtp.account().model_dump(mode="json"),
    )
    # What the routers counted: 25 messages from one sender in this window.
    catalog.conn.execute(
        "INSERT INTO sender_rates (channel_id, sender, window_start, messages) "
        "VALUES (%s, 'looper@example.org', "
        "to_timestamp(floor(extract(epoch FROM now()) / %s) * %s), 25)",
        (channel.id, settings.loop_window_seconds, settings.loop_window_seconds),
    )

    def reply(key: str, to: str, *, automatic: bool) -> OutboundEmail:
        return OutboundEmail(
            idempotency_key=f"{key}-{uuid.uuid4().hex[:6]}",
            channel_id=channel.id,
            to=[Address(email=to)],
            subject="We got your message",
            text_body="Thank you.",
            automatic=automatic,
        )

    held = reply("auto-looper", "Looper@Example.org", automatic=True)
    by_person = reply("agent-looper", "looper@example.org", automatic=False)
    calm = reply("auto-calm", "calm@example.org", automatic=True)

    service = Service("sender", service_env(settings), tmp_path)
    try:
        publish_replies(settings, held, by_person, calm)
        found = {s.idempotency_key: s for s in statuses(settings, 3)}
        received = smtp.wait_for(2)
    finally:
        service.stop()

    assert DeliveryState.FAILED == found[held.idempotency_key].state
    assert "loop guard" in found[held.idempotency_key].detail
    assert "looper@example.org" in found[held.idempotency_key].detail
    assert DeliveryState.SENT == found[by_person.idempotency_key].state
    assert DeliveryState.SENT == found[calm.idempotency_key].state
    assert [["looper@example.org"], ["calm@example.org"]] == sorted(
        [list(m.rcpt_tos) for m in received], reverse=True
    )
