"""Fault injection: the delivery guarantees hold while processes and servers die.

The services run as separate processes against a RabbitMQ node and a
PostgreSQL instance of this module's own (the shared servers are never
touched), fed by a real Dovecot and read by a stand-in campaign system that
answers every routed email with a reply. Each stream of mail is broken on
purpose, then every message is accounted for:

- SIGKILL of poller, router and sender at random moments, ``TRIALS`` times
  each, and a UIDVALIDITY reset of one mailbox in the middle;
- a crash-restart of PostgreSQL and a restart of RabbitMQ, then SIGTERM of
  every worker;
- a message the router dies on every time it handles it;
- an SMTP server answering 421, 451 and 550 and hanging up.

Every mail appended must reach a campaign queue under one RoutedEmail id
(copies of the same id are what at-least-once publishing allows; the stable id
is there for consumers to drop them), no reply may reach the SMTP server
twice, and every reply must end with a ``sent`` or ``failed`` status.

``MAILROOM_FAULT_TRIALS`` sets the kills per worker kind (20 by default, 200
for the long run). The seed of the random choices is printed; set
``MAILROOM_FAULT_SEED`` to replay them (process timing still varies).
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import amqp
import pytest
from cryptography.fernet import Fernet
from psycopg import sql

from services.sender.compose import message_id_for
from shared import blobs, broker, db
from shared.broker import Outgoing, Publisher
from shared.catalog import Catalog
from shared.errors import BrokerError
from shared.models import (
    Address,
    DeliveryState,
    DeliveryStatus,
    MailSource,
    OutboundEmail,
    Payload,
    Protocol,
    RawEmail,
    RoutedEmail,
)
from shared.secrets import SecretBox
from shared.settings import Settings
from shared.topology import OUTBOUND_KEY, RAW_KEY, Topology
from tests.support.dovecot import Dovecot
from tests.support.postgres_node import PostgresNode
from tests.support.processes import Service, service_env
from tests.support.rabbitmq_node import RabbitNode
from tests.support.smtp import Mode, SmtpServer

TRIALS = int(os.environ.get("MAILROOM_FAULT_TRIALS", "20"))
SEED = int(os.environ.get("MAILROOM_FAULT_SEED") or random.randrange(2**32))
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / f"faults-{SEED}"
READY = {"poller": "polling", "router": "consuming", "sender": "consuming"}
KINDS = ("poller", "router", "sender")
CAMPAIGNS = ("general", "vip")
FINAL = frozenset({DeliveryState.SENT, DeliveryState.FAILED})
DOMAIN = "faults.test"
# A worker sent SIGTERM gets this long to finish its batch before SIGKILL.
STOP_SECONDS = 15.0
# How long a stream may take to drain once the faults stop.
SETTLE_SECONDS = 120.0 + TRIALS

# A kill cycle (restart, readiness, random wait) takes about 3 s.
pytestmark = pytest.mark.timeout(300 + 12 * TRIALS)


@pytest.fixture(scope="module")
def rabbit() -> Iterator[RabbitNode]:
    with RabbitNode() as node:
        yield node


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresNode]:
    with PostgresNode() as node:
        yield node


@pytest.fixture(scope="module")
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer(Mode.PLAIN) as server:
        yield server


@dataclass
class Deployment:
    """One namespace of queues and one database on the module's own servers."""

    settings: Settings
    rabbit: RabbitNode
    topology: Topology
    catalog: Catalog
    env: dict[str, str]

    @property
    def url(self) -> str:
        return self.rabbit.url

    def queues(self) -> dict[str, tuple[int, int]]:
        prefix = self.settings.broker_prefix + "."
        return {q: n for q, n in self.rabbit.queues().items() if q.startswith(prefix)}

    def query(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        with db.connect(self.settings.database_url.get_secret_value()) as conn:
            return conn.execute(sql, params).fetchall()

    def publish(self, *messages: Outgoing) -> None:
        connection = broker.connect(self.url, attempts=3)
        try:
            Publisher(connection).publish_all(list(messages))
        finally:
            connection.release()


def deploy(rabbit: RabbitNode, database: PostgresNode | str, **env: str) -> Deployment:
    """A namespace on ``rabbit`` and a database: a new one on a PostgresNode,
    or the one a URL names."""
    if isinstance(database, PostgresNode):
        url = database.create_database(f"faults_{uuid.uuid4().hex[:8]}")
    else:
        url = database
    db.migrate(url)
    settings = Settings(
        database_url=url,
        amqp_url=rabbit.url,
        broker_prefix=f"f{uuid.uuid4().hex[:8]}",
        secret_keys=Fernet.generate_key().decode(),
        metrics_port=0,
    )
    topology = Topology(prefix=settings.broker_prefix)
    connection = broker.connect(rabbit.url, attempts=3)
    try:

        def declare(channel: Any) -> None:
            topology.declare(channel)
            for key in CAMPAIGNS:
                topology.declare_campaign(channel, key)

        broker.declare(connection, declare)
    finally:
        connection.release()

    defaults = {
        "MAILROOM_LEASE_SECONDS": "2",
        "MAILROOM_RETRY_DELAYS_SECONDS": "[1,1,2]",
        "MAILROOM_SMTP_TIMEOUT_SECONDS": "3",
    }
    conn = db.connect(url)
    assert settings.secret_keys is not None
    catalog = Catalog(conn, SecretBox(settings.secret_keys.get_secret_value()))
    for key in CAMPAIGNS:
        catalog.add_campaign(key, key.title())
    return Deployment(
        settings, rabbit, topology, catalog, service_env(settings, **defaults | env)
    )


class Fleet:
    """The service processes of one deployment, restarted as the test says."""

    def __init__(self, deployment: Deployment, kinds: tuple[str, ...] = KINDS):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.env = deployment.env
        self.generations: dict[str, list[Service]] = defaultdict(list)
        self.kills: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()
        self.exits: dict[str, list[int]] = defaultdict(list)
        for kind in kinds:
            self.start(kind)

    def start(self, kind: str) -> Service:
        service = Service(kind, self.env, ARTIFACTS)
        self.generations[kind].append(service)
        return service

    def current(self, kind: str) -> Service:
        return self.generations[kind][-1]

    def wait_ready(self, kind: str, timeout: float = 90.0) -> None:
        service = self.current(kind)
        deadline = time.monotonic() + timeout
        marker = f'"event": "{READY[kind]}"'
        while marker not in service.text():
            if not service.alive() or time.monotonic() > deadline:
                raise AssertionError(
                    f"{kind} did not get ready (alive: {service.alive()}); its log "
                    f"{service.log_path}:\n{service.text()[-3000:]}"
                )
            time.sleep(0.05)

    def kill(self, kind: str) -> None:
        self.current(kind).kill()
        self.kills[kind] += 1

    def terminate(self, kind: str) -> int:
        code = self.current(kind).stop(STOP_SECONDS)
        self.exits[kind].append(code)
        return code

    def lines(self, kind: str) -> Iterator[dict[str, Any]]:
        for service in self.generations[kind]:
            yield from service.lines()

    def stop(self) -> None:
        for services in self.generations.values():
            for service in services:
                if service.alive():
                    service.stop(STOP_SECONDS)


@dataclass
class Mailbox:
    user: str
    channel_id: int
    lock: threading.Lock = field(default_factory=threading.Lock)


def add_mailboxes(
    deployment: Deployment,
    dovecot: Dovecot,
    smtp: SmtpServer,
    protocols: list[str],
) -> list[Mailbox]:
    """Channels reading Dovecot mailboxes and replying through ``smtp``.

    The first IMAP mailbox is polled without IDLE, so the poller holds no
    session on it between polls and its UIDVALIDITY can be reset.
    """
    mailboxes = []
    for n, protocol in enumerate(protocols):
        user, password = f"f{n}x{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        dovecot.add_user(user, password)
        port = dovecot.imap_port if protocol == "imap" else dovecot.pop3_port
        inbound: dict[str, Any] = {
            "type": protocol,
            "host": "127.0.0.1",
            "port": port,
            "security": "none",
            "username": user,
        }
        if protocol == "imap":
            inbound["idle"] = n > 0
        channel = deployment.catalog.add_channel(
            f"channel-{n}",
            address=f"{user}@{DOMAIN}",
            default_campaign="general",
            inbound=inbound,
            outbound=smtp.account().model_dump(mode="json"),
            secrets={"inbound_password": password},
        )
        deployment.catalog.add_filter(channel.id, "sender", "@vip.example", "vip")
        deployment.catalog.set_active(channel.id, True)
        mailboxes.append(Mailbox(user, channel.id))
    return mailboxes


def mail(number: int, tag: str) -> tuple[str, bytes]:
    """A small customer message; every fourth comes from a VIP."""
    message_id = f"{tag}-{number}@customer.example"
    message = EmailMessage()
    domain = "vip.example" if number % 4 == 0 else "customer.example"
    message["From"] = f"Customer {number} <c{number}@{domain}>"
    message["To"] = f"support@{DOMAIN}"
    message["Subject"] = f"Question {number}"
    message["Message-ID"] = f"<{message_id}>"
    message.set_content(f"Hello, this is question {number} of {tag}.\n")
    return message_id, bytes(message)


class Background(threading.Thread):
    """A thread whose exception the test re-raises when it joins it."""

    def __init__(self, target: Callable[[], None], name: str):
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._target_fn()
        except BaseException as exc:
            self.error = exc

    def finish(self, timeout: float | None = None) -> None:
        self.join(timeout)
        if self.error is not None:
            raise self.error


class Feeder:
    """Appends mail to the mailboxes in small bursts until stopped."""

    def __init__(
        self,
        dovecot: Dovecot,
        mailboxes: list[Mailbox],
        rng: random.Random,
        per_second: float,
    ):
        self.dovecot = dovecot
        self.mailboxes = mailboxes
        self.rng = rng
        self.per_second = per_second
        self.appended: dict[str, int] = {}
        self.stopping = threading.Event()
        self.tag = uuid.uuid4().hex[:6]
        self.thread = Background(self._run, "feeder")
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.finish()

    def _run(self) -> None:
        while not self.stopping.is_set():
            mailbox = self.rng.choice(self.mailboxes)
            burst = self.rng.randint(1, 8)
            with mailbox.lock, self.dovecot.client(mailbox.user) as client:
                for _ in range(burst):
                    message_id, raw = mail(len(self.appended), self.tag)
                    client.append("INBOX", raw)
                    self.appended[message_id] = mailbox.channel_id
            self.stopping.wait(burst / self.per_second)


@dataclass(frozen=True)
class Delivery:
    """One message a campaign system took from a campaign queue."""

    routed_id: str
    message_id: str
    redelivered: bool


class CampaignSystem:
    """Reads the campaign and status queues and answers each routed email.

    Every routed email gets one reply (about one in eight is published twice,
    as a campaign system retrying would). It reconnects when the broker goes
    away, and keeps the size of the largest body it read.
    """

    def __init__(self, deployment: Deployment, *, reply: bool = True):
        self.deployment = deployment
        self.reply = reply
        topology = deployment.topology
        self.queues = [topology.campaign_queue(k) for k in CAMPAIGNS]
        self.queues.append(topology.status_queue)
        self.deliveries: list[Delivery] = []
        self.routed: dict[str, RoutedEmail] = {}
        self.replies: dict[str, OutboundEmail] = {}
        self.statuses: dict[str, list[DeliveryStatus]] = defaultdict(list)
        self.largest_body = 0
        self.stopping = threading.Event()
        self.thread = Background(self._run, "campaign-system")
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.finish()

    def open_keys(self) -> set[str]:
        """Replies without a final status yet."""
        return {
            key
            for key in self.replies
            if not FINAL & {s.state for s in self.statuses.get(key, [])}
        }

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self._consume()
            except (*broker.CONNECTION_ERRORS, BrokerError):
                self.stopping.wait(0.5)

    def _consume(self) -> None:
        connection = broker.connect(self.deployment.url, attempts=2)
        try:
            channel = connection.channel()
            channel.basic_qos(0, 500, False)
            taken: list[tuple[str, amqp.Message]] = []
            for queue in self.queues:
                channel.basic_consume(
                    queue, callback=lambda m, q=queue: taken.append((q, m))
                )
            publisher = Publisher(connection)
            while not self.stopping.is_set():
                try:
                    connection.drain_events(timeout=0.2)
                except TimeoutError:
                    pass
                batch, taken[:] = list(taken), []
                replies: dict[str, OutboundEmail] = {}
                for queue, message in batch:
                    replies.update(self._record(queue, message))
                if replies:
                    publisher.publish_all(
                        [out for e in replies.values() for out in self._publish(e)]
                    )
                # Only a confirmed reply counts: an unconfirmed one is made
                # again when its routed email is delivered again.
                self.replies.update(replies)
                for _queue, message in batch:
                    channel.basic_ack(message.delivery_tag)
        finally:
            connection.release()

    def _record(self, queue: str, message: amqp.Message) -> dict[str, OutboundEmail]:
        body = bytes(message.body)
        self.largest_body = max(self.largest_body, len(body))
        if queue == self.deployment.topology.status_queue:
            status = DeliveryStatus.model_validate_json(body)
            self.statuses[status.idempotency_key].append(status)
            return {}

        routed = RoutedEmail.model_validate_json(body)
        self.deliveries.append(
            Delivery(
                str(routed.id),
                routed.headers.message_id.strip("<>"),
                bool(message.delivery_info.get("redelivered")),
            )
        )
        self.routed.setdefault(str(routed.id), routed)
        key = f"reply-{routed.id}"
        if not self.reply or key in self.replies:
            return {}

        email = OutboundEmail(
            idempotency_key=key,
            channel_id=routed.channel_id,
            to=routed.headers.from_,
            subject=f"Re: {routed.headers.subject}",
            text_body="Thank you, we are on it.",
            in_reply_to=routed.headers.message_id,
        )
        return {key: email}

    def _publish(self, email: OutboundEmail) -> list[Outgoing]:
        out = Outgoing(
            self.deployment.topology.outbound_exchange,
            OUTBOUND_KEY,
            email.to_json(),
            message_id=email.idempotency_key,
        )
        return [out, out] if email.idempotency_key.endswith(("0", "8")) else [out]


@dataclass
class StreamResult:
    """Everything one stream produced, for the tests to check."""

    appended: dict[str, int]
    campaign: CampaignSystem
    smtp_received: Counter[str]
    """Messages the SMTP server took, by idempotency key ("?": unknown)."""
    quarantined: list[dict[str, Any]]
    router_duplicates: list[str]
    fleet: Fleet
    queues_left: dict[str, tuple[int, int]]
    notes: dict[str, Any] = field(default_factory=dict)

    def missing(self) -> set[str]:
        """Appended mail that no campaign queue delivered."""
        return set(self.appended) - {d.message_id for d in self.campaign.deliveries}

    def routed_twice(self) -> dict[str, set[str]]:
        """Mail delivered under more than one RoutedEmail id."""
        ids: dict[str, set[str]] = defaultdict(set)
        for d in self.campaign.deliveries:
            ids[d.message_id].add(d.routed_id)
        return {m: i for m, i in ids.items() if len(i) > 1}

    def copies(self) -> int:
        """Fresh deliveries of an id delivered before: at-least-once repeats."""
        fresh = [d.routed_id for d in self.campaign.deliveries if not d.redelivered]
        return len(fresh) - len(set(fresh))

    def final_states(self) -> dict[str, DeliveryState | None]:
        return {
            key: next(
                (
                    s.state
                    for s in self.campaign.statuses.get(key, [])
                    if s.state in FINAL
                ),
                None,
            )
            for key in self.campaign.replies
        }

    def summary(self, title: str) -> str:
        final = self.final_states()
        states = Counter(final.values())
        unknown = [
            key
            for key, state in final.items()
            if state is DeliveryState.FAILED and self.smtp_received[key]
        ]
        return (
            f"{title} (seed {SEED}): appended {len(self.appended)}, "
            f"routed {len(self.campaign.routed)} "
            f"(+{self.copies()} repeated deliveries of a routed id), "
            f"duplicates suppressed by the router {len(self.router_duplicates)}, "
            f"quarantined {len(self.quarantined)}, "
            f"replies {len(self.campaign.replies)}: sent {states[DeliveryState.SENT]}, "
            f"failed {states[DeliveryState.FAILED]} "
            f"({len(unknown)} of them delivered before the sender died), "
            f"without a final status {states[None]}, "
            f"received by SMTP {sum(self.smtp_received.values())}, "
            f"kills {dict(self.fleet.kills)} ({dict(self.fleet.notes)}), "
            f"SIGTERM exits {dict(self.fleet.exits)}, "
            f"{self.notes}"
        )


def settle(
    deployment: Deployment,
    fleet: Fleet,
    appended: dict[str, int],
    campaign: CampaignSystem,
    smtp: SmtpServer,
    smtp_start: int,
) -> StreamResult:
    """Wait until every mail is routed, every reply final and every queue
    empty (or the time is up), then collect what happened."""
    deadline = time.monotonic() + SETTLE_SECONDS
    busy: dict[str, tuple[int, int]] = {}
    while time.monotonic() < deadline:
        routed = {d.message_id for d in campaign.deliveries}
        busy = {q: n for q, n in deployment.queues().items() if n != (0, 0)}
        if set(appended) <= routed and not campaign.open_keys() and not busy:
            break
        time.sleep(1.0)
    campaign.stop()
    fleet.stop()

    # The Message-ID of each reply, as the sender makes it from the key.
    keys = {message_id_for(key, DOMAIN): key for key in campaign.replies}
    received = Counter(
        keys.get(header_value(m.data, b"Message-ID"), "?")
        for m in smtp.messages[smtp_start:]
    )
    quarantined = deployment.query(
        "SELECT id, stage, reason, body FROM quarantine ORDER BY id"
    )
    duplicates = [
        str(line.get("source"))
        for line in fleet.lines("router")
        if line.get("outcome") == "duplicate"
    ]
    return StreamResult(
        dict(appended), campaign, received, quarantined, duplicates, fleet, busy
    )


def header_value(data: bytes, name: bytes) -> str:
    for line in data.split(b"\r\n\r\n", 1)[0].splitlines():
        if line.lower().startswith(name.lower() + b":"):
            return line.split(b":", 1)[1].strip().decode()
    return ""


def report(outcome: StreamResult, title: str) -> None:
    text = outcome.summary(title)
    print("\n" + text)
    with (ARTIFACTS / "summary.txt").open("a") as summary:
        summary.write(text + "\n")


# A table each worker writes after it publishes a batch and reads before: a
# worker held up on it holds unacknowledged work, published or not, which is
# where a crash costs the most.
STALL_TABLES = {
    "poller": "mailbox_checkpoints",
    "router": "routed_messages",
    "sender": "outbound_deliveries",
}


def kill_at_random(
    deployment: Deployment,
    fleet: Fleet,
    kind: str,
    rng: random.Random,
    between_kill_and_start: Callable[[int], None] | None = None,
) -> None:
    """SIGKILL a worker ``TRIALS`` times, each at a random moment after it got
    ready; every other time, on average, while it is stalled mid-batch."""
    for trial in range(TRIALS):
        fleet.wait_ready(kind)
        time.sleep(rng.uniform(0.0, 2.0))
        if rng.random() < 0.5:
            mode = rng.choice(["SHARE", "ACCESS EXCLUSIVE"])
            with stalled(deployment, STALL_TABLES[kind], mode):
                fleet.kill(kind)
        else:
            fleet.kill(kind)
            fleet.notes[f"{kind} kills at a random moment"] += 1
        if between_kill_and_start is not None:
            between_kill_and_start(trial)
        fleet.start(kind)
    fleet.wait_ready(kind)


@contextmanager
def stalled(
    deployment: Deployment, table: str, mode: str, wait: float = 5.0
) -> Iterator[None]:
    """Lock ``table`` until a worker waits for it or ``wait`` seconds pass; the
    body runs while it waits. In SHARE mode reads go on and writes wait (after
    a publish); in ACCESS EXCLUSIVE mode reads wait too (before it).

    The waiting backend is ended with the lock still held, so the statement
    of a worker killed in the body never runs after its death.
    """
    url = deployment.settings.database_url.get_secret_value()
    with db.connect(url, autocommit=False) as locker, db.connect(url) as watcher:
        locker.execute(
            sql.SQL("LOCK TABLE {} IN {} MODE").format(
                sql.Identifier(table), sql.SQL(mode)
            )
        )
        deadline = time.monotonic() + wait
        waiting: list[dict[str, Any]] = []
        while not waiting and time.monotonic() < deadline:
            time.sleep(0.02)
            waiting = watcher.execute(
                """
                SELECT pid FROM pg_stat_activity
                WHERE datname = current_database() AND wait_event_type = 'Lock'
                  AND query ILIKE %s
                """,
                (f"%{table}%",),
            ).fetchall()
        yield
        for row in waiting:
            watcher.execute("SELECT pg_terminate_backend(%s)", (row["pid"],))
        locker.rollback()


# --- SIGKILL at random moments ------------------------------------------------


@pytest.fixture(scope="module")
def killed(
    rabbit: RabbitNode, postgres: PostgresNode, dovecot: Dovecot, smtp: SmtpServer
) -> Iterator[StreamResult]:
    """One stream of mail and replies while every worker kind is killed."""
    print(f"\nSIGKILL stream: seed {SEED}, {TRIALS} trials per worker kind")
    deployment = deploy(rabbit, postgres)
    mailboxes = add_mailboxes(deployment, dovecot, smtp, ["imap", "imap", "pop3"])
    smtp_start = len(smtp.messages)
    campaign = CampaignSystem(deployment)
    fleet = Fleet(deployment)
    feeder = Feeder(dovecot, mailboxes, random.Random(f"{SEED}-feed"), 12.0)
    reset: dict[str, Any] = {}
    target = mailboxes[0]

    def reset_uidvalidity(trial: int) -> None:
        # Halfway, while no poller runs: the folder is numbered anew.
        if trial != TRIALS // 2:
            return
        with target.lock:
            time.sleep(0.5)
            reset["messages"] = dovecot.message_count(target.user)
            reset["uidvalidity"] = dovecot.reset_uidvalidity(target.user)

    killers = [
        Background(
            lambda kind=kind: kill_at_random(
                deployment,
                fleet,
                kind,
                random.Random(f"{SEED}-{kind}"),
                reset_uidvalidity if kind == "poller" else None,
            ),
            f"kill-{kind}",
        )
        for kind in KINDS
    ]
    try:
        for killer in killers:
            killer.start()
        for killer in killers:
            killer.finish()
        feeder.stop()
        alive = {kind: fleet.current(kind).alive() for kind in KINDS}
        outcome = settle(deployment, fleet, feeder.appended, campaign, smtp, smtp_start)
        outcome.notes["uidvalidity reset"] = reset
        outcome.notes["alive at the end"] = alive
        report(outcome, "SIGKILL stream")
        yield outcome
    finally:
        feeder.stopping.set()
        campaign.stopping.set()
        fleet.stop()


def test_every_mail_reaches_its_campaign_under_one_id_while_workers_are_killed(
    killed: StreamResult,
) -> None:
    assert set() == killed.missing()
    assert {} == killed.routed_twice()
    assert set(killed.appended) == {d.message_id for d in killed.campaign.deliveries}


def test_no_mail_is_quarantined_while_workers_are_killed(killed: StreamResult) -> None:
    assert [] == [(q["stage"], q["reason"]) for q in killed.quarantined]


def test_no_reply_reaches_the_smtp_server_twice_while_the_sender_is_killed(
    killed: StreamResult,
) -> None:
    twice = {key: n for key, n in killed.smtp_received.items() if n > 1}

    assert {} == twice
    assert "?" not in killed.smtp_received


def test_every_reply_ends_sent_or_failed_while_the_sender_is_killed(
    killed: StreamResult,
) -> None:
    states = killed.final_states()
    sent = {key for key, state in states.items() if state is DeliveryState.SENT}

    assert {} == {key: s for key, s in states.items() if s is None}
    assert set() == sent - set(killed.smtp_received)


def test_every_worker_kind_is_killed_the_number_of_trials_and_recovers(
    killed: StreamResult,
) -> None:
    assert {kind: TRIALS for kind in KINDS} == dict(killed.fleet.kills)
    assert {kind: True for kind in KINDS} == killed.notes["alive at the end"]
    assert {} == killed.queues_left


def test_a_mailbox_read_again_after_a_uidvalidity_reset_is_dropped_as_duplicates(
    killed: StreamResult,
) -> None:
    reset = killed.notes["uidvalidity reset"]
    prefix = f"imap:INBOX:{reset['uidvalidity']}:"
    reread = [s for s in killed.router_duplicates if s.startswith(prefix)]
    # Mail appended just before the reset and not fetched yet is new, not a
    # duplicate: it is routed once under the new UIDVALIDITY.
    first_seen = [
        r for r in killed.campaign.routed.values() if r.source.key().startswith(prefix)
    ]

    assert reset["messages"] > 0
    assert reset["messages"] <= len(reread) + len(first_seen)


# --- server restarts and SIGTERM ----------------------------------------------


@pytest.fixture(scope="module")
def restarted(
    rabbit: RabbitNode, postgres: PostgresNode, dovecot: Dovecot, smtp: SmtpServer
) -> Iterator[StreamResult]:
    """One stream through a PostgreSQL crash-restart, a RabbitMQ restart, and a
    SIGTERM of each worker."""
    print(f"\nrestart stream: seed {SEED}")
    rng = random.Random(f"{SEED}-restart")
    deployment = deploy(rabbit, postgres)
    mailboxes = add_mailboxes(deployment, dovecot, smtp, ["imap", "imap", "pop3"])
    smtp_start = len(smtp.messages)
    campaign = CampaignSystem(deployment)
    fleet = Fleet(deployment)
    feeder = Feeder(dovecot, mailboxes, random.Random(f"{SEED}-feed2"), 12.0)
    first = {kind: fleet.current(kind) for kind in KINDS}
    try:
        for kind in KINDS:
            fleet.wait_ready(kind)
        time.sleep(rng.uniform(2.0, 5.0))
        postgres.stop("immediate")
        time.sleep(rng.uniform(1.0, 3.0))
        postgres.start()
        time.sleep(rng.uniform(2.0, 5.0))
        rabbit.stop()
        time.sleep(rng.uniform(1.0, 3.0))
        rabbit.start()
        time.sleep(rng.uniform(3.0, 6.0))
        survived = {kind: first[kind].alive() for kind in KINDS}
        for kind in KINDS:
            if not survived[kind]:
                fleet.start(kind)

        for kind in KINDS:
            fleet.wait_ready(kind)
            time.sleep(rng.uniform(0.5, 2.0))
            fleet.terminate(kind)
            fleet.start(kind)
        for kind in KINDS:
            fleet.wait_ready(kind)
        time.sleep(2.0)
        feeder.stop()

        outcome = settle(deployment, fleet, feeder.appended, campaign, smtp, smtp_start)
        outcome.notes["survived"] = survived
        outcome.notes["reconnected"] = {
            kind: sum(
                1
                for line in first[kind].lines()
                if line.get("event") == "connection lost, reconnecting"
            )
            for kind in KINDS
        }
        report(outcome, "restart stream")
        yield outcome
    finally:
        feeder.stopping.set()
        campaign.stopping.set()
        fleet.stop()


def test_workers_outlive_a_postgresql_crash_and_a_rabbitmq_restart(
    restarted: StreamResult,
) -> None:
    reconnected = restarted.notes["reconnected"]

    assert {kind: True for kind in KINDS} == restarted.notes["survived"]
    assert {kind: True for kind in KINDS} == {k: n > 0 for k, n in reconnected.items()}


def test_no_mail_is_lost_or_routed_under_two_ids_across_server_restarts(
    restarted: StreamResult,
) -> None:
    assert set() == restarted.missing()
    assert {} == restarted.routed_twice()
    assert [] == [(q["stage"], q["reason"]) for q in restarted.quarantined]


def test_every_reply_is_sent_at_most_once_and_ends_final_across_server_restarts(
    restarted: StreamResult,
) -> None:
    states = restarted.final_states()

    assert {} == {key: n for key, n in restarted.smtp_received.items() if n > 1}
    assert {} == {key: s for key, s in states.items() if s is None}
    assert {} == restarted.queues_left


def test_workers_stopped_with_sigterm_under_load_exit_with_status_zero(
    restarted: StreamResult,
) -> None:
    assert {kind: [0] for kind in KINDS} == dict(restarted.fleet.exits)


def test_idle_workers_keep_their_broker_connection_past_missed_heartbeats(
    rabbit: RabbitNode, postgres: PostgresNode
) -> None:
    # With a 3-second heartbeat the broker drops a connection it hears
    # nothing from within about 9 s, as it does within 90 s at the default 30.
    # A worker that does not touch its connection learns of it only later,
    # so the broker's log is read too.
    deployment = deploy(rabbit, postgres, MAILROOM_AMQP_URL=f"{rabbit.url}?heartbeat=3")
    fleet = Fleet(deployment)
    dropped_before = rabbit.log().count("missed heartbeats from client")
    try:
        for kind in KINDS:
            fleet.wait_ready(kind)
        time.sleep(14.0)
        alive = {kind: fleet.current(kind).alive() for kind in KINDS}
        dropped = rabbit.log().count("missed heartbeats from client") - dropped_before
    finally:
        fleet.stop()
    lost = {
        kind: [
            line.get("error")
            for line in fleet.lines(kind)
            if line.get("event") == "connection lost, reconnecting"
        ]
        for kind in KINDS
    }

    assert {kind: True for kind in KINDS} == alive
    assert {kind: [] for kind in KINDS} == lost
    assert 0 == dropped


# --- a message the router cannot survive ---------------------------------------


def raw_email(deployment: Deployment, channel_id: int, payload: Payload) -> Outgoing:
    raw = RawEmail(
        channel_id=channel_id,
        source=MailSource(protocol=Protocol.POP3, uidl=uuid.uuid4().hex),
        raw=payload,
    )
    return Outgoing(
        deployment.topology.raw_exchange, RAW_KEY, raw.to_json(), str(raw.id)
    )


def router_deployment(
    rabbit: RabbitNode, postgres: PostgresNode
) -> tuple[Deployment, int]:
    """A deployment with one channel to route for, and no mailbox."""
    deployment = deploy(rabbit, postgres)
    channel = deployment.catalog.add_channel(
        "poison", address=f"poison@{DOMAIN}", default_campaign="general"
    )
    return deployment, channel.id


def test_a_raw_email_the_router_dies_on_every_time_is_quarantined_at_the_limit(
    rabbit: RabbitNode, postgres: PostgresNode
) -> None:
    # The router reads a claim check's bytes from the blobs table. While the
    # test holds that table locked, the router hangs on the message, and the
    # test kills it there: to the worker this is a message it dies on every
    # time it handles it, like one that crashes the interpreter.
    deployment, channel_id = router_deployment(rabbit, postgres)
    _message_id, data = mail(0, "poison")
    with db.connect(deployment.settings.database_url.get_secret_value()) as conn:
        payload = blobs.put(conn, data, inline_max=0)
    fleet = Fleet(deployment, ("router",))
    locker = db.connect(
        deployment.settings.database_url.get_secret_value(), autocommit=False
    )
    try:
        locker.execute("LOCK TABLE blobs IN ACCESS EXCLUSIVE MODE")
        fleet.wait_ready("router")
        deployment.publish(raw_email(deployment, channel_id, payload))
        deadline = time.monotonic() + 120
        seen: set[int] = set()
        while not deployment.query("SELECT id FROM quarantine"):
            assert time.monotonic() < deadline, fleet.current("router").text()[-3000:]
            if blocked_on_blobs(deployment) - seen:
                seen |= blocked_on_blobs(deployment)
                fleet.kill("router")
                fleet.start("router")
                fleet.wait_ready("router")
            time.sleep(0.05)
        locker.rollback()

        fine_id, fine = mail(1, "after-poison")
        deployment.publish(raw_email(deployment, channel_id, Payload.of(fine)))
        campaign = CampaignSystem(deployment, reply=False)
        deadline = time.monotonic() + 60
        while not campaign.deliveries and time.monotonic() < deadline:
            time.sleep(0.1)
        campaign.stop()
        [entry] = deployment.query("SELECT stage, reason FROM quarantine")
    finally:
        locker.close()
        fleet.stop()
    print(
        f"\npoison message (seed {SEED}): quarantined after "
        f"{fleet.kills['router']} router kills"
    )

    assert deployment.settings.delivery_limit == fleet.kills["router"]
    assert "router" == entry["stage"]
    assert entry["reason"].startswith(
        f"delivered {deployment.settings.delivery_limit} times without being handled"
    )
    assert [fine_id] == [d.message_id for d in campaign.deliveries]


def blocked_on_blobs(deployment: Deployment) -> set[int]:
    """The backends of this database that wait for the lock on blobs."""
    rows = deployment.query(
        """
        SELECT pid FROM pg_stat_activity
        WHERE datname = current_database() AND wait_event_type = 'Lock'
          AND query ILIKE '%%FROM blobs%%'
        """
    )
    return {int(r["pid"]) for r in rows}


def test_a_raw_email_that_is_not_json_is_quarantined_at_its_first_delivery(
    rabbit: RabbitNode, postgres: PostgresNode
) -> None:
    deployment, _channel_id = router_deployment(rabbit, postgres)
    fleet = Fleet(deployment, ("router",))
    try:
        fleet.wait_ready("router")
        deployment.publish(
            Outgoing(
                deployment.topology.raw_exchange, RAW_KEY, b"\x00 not json", "bad-1"
            )
        )
        deadline = time.monotonic() + 60
        while not deployment.query("SELECT id FROM quarantine"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        rows = deployment.query("SELECT stage, reason, body FROM quarantine")
        handled = [
            line.get("outcome")
            for line in fleet.lines("router")
            if line.get("event") == "handled"
        ]
    finally:
        fleet.stop()

    assert [
        ("router", "not a valid RawEmail (see the detail for the fields at fault)")
    ] == [(r["stage"], r["reason"]) for r in rows]
    assert b"\x00 not json" == bytes(rows[0]["body"])
    assert ["quarantined"] == handled
    assert 0 == fleet.kills["router"]


# --- SMTP servers that refuse, defer and hang up ------------------------------


def test_smtp_4xx_and_hang_ups_are_retried_then_sent_and_550_fails_at_once(
    rabbit: RabbitNode, postgres: PostgresNode, smtp: SmtpServer
) -> None:
    deployment = deploy(rabbit, postgres)
    channel = deployment.catalog.add_channel(
        "replies",
        address=f"replies@{DOMAIN}",
        default_campaign="general",
        outbound=smtp.account().model_dump(mode="json"),
    )
    emails = {
        name: OutboundEmail(
            idempotency_key=f"{name}-{uuid.uuid4().hex[:8]}",
            channel_id=channel.id,
            to=[Address(email=f"{name}@customer.example")],
            subject=f"Reply {name}",
            text_body="Hello",
        )
        for name in ("hangup", "idle", "r421", "r451", "r550", "never")
    }
    smtp.fail_next("rcpt", "421 4.3.2 shutting down", address="r421@customer.example")
    smtp.fail_next(
        "rcpt", "451 4.3.0 greylisted", times=2, address="r451@customer.example"
    )
    smtp.fail_next(
        "rcpt", "550 5.1.1 no such user here", address="r550@customer.example"
    )
    smtp.fail_next(
        "rcpt", "452 4.2.2 mailbox full", times=10, address="never@customer.example"
    )
    campaign = CampaignSystem(deployment, reply=False)
    fleet = Fleet(deployment, ("sender",))
    before = Counter(header_value(m.data, b"Message-ID") for m in smtp.messages)

    def send(*names: str) -> None:
        deployment.publish(
            *[
                Outgoing(
                    deployment.topology.outbound_exchange,
                    OUTBOUND_KEY,
                    emails[name].to_json(),
                    emails[name].idempotency_key,
                )
                for name in names
            ]
        )
        keys = {emails[name].idempotency_key for name in names}
        deadline = time.monotonic() + 60
        while keys - {
            key
            for key, statuses in campaign.statuses.items()
            if FINAL & {s.state for s in statuses}
        }:
            assert time.monotonic() < deadline, dict(campaign.statuses)
            time.sleep(0.1)

    try:
        fleet.wait_ready("sender")
        # The first message's DATA is met by a hang-up: not delivered.
        smtp.drop_next_connection("data")
        send("hangup")
        # Servers hang up on idle clients; the next send reconnects.
        smtp.disconnect_all()
        send("idle", "r421", "r451", "r550", "never")
    finally:
        campaign.stop()
        fleet.stop()

    states = {
        name: [s.state.value for s in campaign.statuses[email.idempotency_key]]
        for name, email in emails.items()
    }
    received = (
        Counter(header_value(m.data, b"Message-ID") for m in smtp.messages) - before
    )
    delivered = {
        name: received[message_id_for(email.idempotency_key, DOMAIN)]
        for name, email in emails.items()
    }
    [refused] = campaign.statuses[emails["r550"].idempotency_key]
    [*_, gave_up] = campaign.statuses[emails["never"].idempotency_key]

    assert {
        "hangup": ["retrying", "sent"],
        "idle": ["sent"],
        "r421": ["retrying", "sent"],
        "r451": ["retrying", "retrying", "sent"],
        "r550": ["failed"],
        "never": ["retrying", "retrying", "retrying", "failed"],
    } == states
    assert {
        "hangup": 1, "idle": 1, "r421": 1, "r451": 1, "r550": 0, "never": 0
    } == delivered  # fmt: skip
    assert 550 == refused.smtp_code
    assert "550 5.1.1 no such user here" in refused.detail
    assert 452 == gave_up.smtp_code
    assert "452 4.2.2 mailbox full" in gave_up.detail
