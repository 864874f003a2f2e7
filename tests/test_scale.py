"""Scale-out: three pollers, two routers and two senders on thirty mailboxes.

A poller is killed with SIGKILL halfway; its channels must be taken over once
their leases expire, and every message must still reach its campaign exactly
once and every reply be sent exactly once.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from shared import broker, db
from shared.broker import Outgoing, Publisher
from shared.catalog import Catalog
from shared.models import Address, DeliveryStatus, OutboundEmail, RoutedEmail
from shared.settings import Settings
from shared.topology import OUTBOUND_KEY, Topology
from tests.conftest import AMQP_URL
from tests.support.dovecot import Dovecot
from tests.support.mail import Sample
from tests.support.processes import Service, service_env
from tests.support.queues import drain
from tests.support.smtp import SmtpServer
from tests.test_pipeline import ARTIFACTS

MAILBOXES = 30
LEASE_SECONDS = 5


def note(i: int, n: int) -> bytes:
    return Sample(
        f"scale-{i}-{n}-{uuid.uuid4().hex[:6]}@test.example",
        f"customer{i}@example.org",
        f"Mailbox {i} message {n}",
        "Hello",
        "general",
        None,
    ).to_bytes()


@pytest.fixture
def cluster(
    settings: Settings,
    catalog: Catalog,
    dovecot: Dovecot,
    smtp_server_factory: Callable[..., SmtpServer],
) -> Iterator[tuple[list[str], dict[str, list[Service]], SmtpServer]]:
    smtp = smtp_server_factory("plain")
    catalog.add_campaign("general", "General")
    users = []
    for i in range(MAILBOXES):
        user, password = f"s{i}x{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
        dovecot.add_user(user, password)
        channel = catalog.add_channel(
            f"channel-{i}",
            address=f"{user}@example.test",
            default_campaign="general",
            inbound={
                "type": "imap",
                "host": "127.0.0.1",
                "port": dovecot.imap_port,
                "security": "none",
                "username": user,
            },
            outbound=smtp.account().model_dump(mode="json"),
            secrets={"inbound_password": password},
        )
        catalog.set_active(channel.id, True)
        users.append(user)

    ARTIFACTS.mkdir(exist_ok=True)
    env = service_env(
        settings,
        MAILROOM_LEASE_SECONDS=str(LEASE_SECONDS),
        MAILROOM_PREFETCH="50",
    )
    services = {
        name: [Service(name, env, ARTIFACTS) for _ in range(count)]
        for name, count in (("router", 2), ("sender", 2), ("poller", 3))
    }
    yield users, services, smtp
    for group in services.values():
        for service in group:
            if service.alive():
                service.stop()


def routed(settings: Settings, expected: int, timeout: float) -> list[RoutedEmail]:
    queue = Topology(prefix=settings.broker_prefix).campaign_queue("general")
    taken = drain(
        AMQP_URL, [queue], until=lambda t: len(t) >= expected, timeout=timeout
    )
    time.sleep(2)
    taken += drain(AMQP_URL, [queue], until=lambda _t: False, timeout=1)
    return [RoutedEmail.model_validate_json(m.body) for m in taken]


def owners(settings: Settings) -> dict[int, str | None]:
    with db.connect(settings.database_url.get_secret_value()) as conn:
        rows = conn.execute("SELECT id, lease_owner FROM channels").fetchall()
    return {r["id"]: r["lease_owner"] for r in rows}


def test_pollers_routers_and_senders_scale_out_and_survive_a_dead_poller(
    settings: Settings,
    dovecot: Dovecot,
    cluster: tuple[list[str], dict[str, list[Service]], SmtpServer],
) -> None:
    users, services, smtp = cluster
    for i, user in enumerate(users):
        for n in range(4):
            dovecot.append(user, note(i, n))

    first = routed(settings, MAILBOXES * 4, timeout=120)
    held = Counter(owner for owner in owners(settings).values())
    victim = services["poller"][0]
    victim_owner = next(o for o in held if o and f":{victim.process.pid}:" in o)
    victim_channels = held[victim_owner]
    victim.kill()
    killed_at = time.monotonic()
    for i, user in enumerate(users):
        for n in range(4, 6):
            dovecot.append(user, note(i, n))

    while victim_owner in owners(settings).values():
        assert time.monotonic() - killed_at < LEASE_SECONDS * 4
        time.sleep(0.2)
    takeover = time.monotonic() - killed_at
    second = routed(settings, MAILBOXES * 2, timeout=120)

    everything = first + second
    keys = Counter((r.channel_id, r.source.key()) for r in everything)
    assert MAILBOXES * 6 == len(everything)
    assert [] == [k for k, n in keys.items() if n > 1]
    assert len(everything) == len({r.id for r in everything})
    assert 3 == len(held) and victim_channels >= 1
    print(
        f"dead poller held {victim_channels} channels; taken over after "
        f"{takeover:.1f} s (lease {LEASE_SECONDS} s)"
    )

    replies = [
        OutboundEmail(
            idempotency_key=f"scale-reply-{n}",
            channel_id=1 + n % MAILBOXES,
            to=[Address(email=f"customer{n}@example.org")],
            subject=f"Reply {n}",
            text_body="Thanks",
        )
        for n in range(40)
    ]
    topology = Topology(prefix=settings.broker_prefix)
    connection = broker.connect(AMQP_URL, attempts=3)
    try:
        Publisher(connection).publish_all(
            [
                Outgoing(topology.outbound_exchange, OUTBOUND_KEY, r.to_json(), "x")
                for r in replies
            ]
        )
    finally:
        connection.release()
    statuses = drain(
        AMQP_URL, [topology.status_queue], until=lambda t: len(t) >= 40, timeout=60
    )

    assert {"sent"} == {
        DeliveryStatus.model_validate_json(s.body).state for s in statuses
    }
    assert sorted(f"Reply {n}" for n in range(40)) == sorted(
        next(
            line.decode().removeprefix("Subject: ")
            for line in m.data.splitlines()
            if line.startswith(b"Subject:")
        )
        for m in smtp.messages
    )
    senders = {line.get("service") for s in services["sender"] for line in s.lines()}
    assert {"sender"} == senders
    handled = [
        sum(1 for line in s.lines() if line.get("outcome") == "sent")
        for s in services["sender"]
    ]
    assert 40 == sum(handled)
