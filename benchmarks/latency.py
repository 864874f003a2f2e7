"""Latency from new mail to a routed message, with IMAP IDLE.

A poller and a router run as separate service processes, as an operator runs
them (polling interval 30 s, so that only IDLE explains a fast pick-up). One
message at a time is appended to the watched mailbox, with short random gaps,
and the time from the start of the APPEND to the RoutedEmail arriving at a
consumer of the campaign queue is taken for each.

The baseline is the floor the server sets: a bare IMAPClient sitting in IDLE
on the same folder, which leaves IDLE on the EXISTS response and fetches the
new message's Message-ID, timed from the same APPEND.
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from collections.abc import Callable

import amqp
from imapclient import IMAPClient

from benchmarks.environment import AMQP_URL, BenchEnv
from benchmarks.mail import small_message
from benchmarks.mailbox import add_user, imap_channel
from benchmarks.report import Figure, Unit
from shared import broker
from tests.support.processes import Service, service_env

START_SECONDS = 60.0
SETTLE_SECONDS = 30.0


class Arrivals:
    """When each Message-ID was seen, by a thread that records it."""

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()
        self.errors: list[str] = []

    def record(self, message_id: str) -> None:
        self.seen.setdefault(message_id.strip().strip("<>"), time.perf_counter())

    def thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        def guarded() -> None:
            try:
                target()
            except Exception as exc:  # noqa: BLE001 - reported with the figure
                self.errors.append(f"{name}: {type(exc).__name__}: {exc}")

        return threading.Thread(target=guarded, name=name, daemon=True)


def consume_routed(queue: str, arrivals: Arrivals, ready: threading.Event) -> None:
    connection = broker.connect(AMQP_URL, attempts=3)
    try:
        channel = connection.channel()

        def on_message(message: amqp.Message) -> None:
            body = json.loads(message.body)
            arrivals.record(body["headers"]["message_id"])

        channel.basic_consume(queue, callback=on_message, no_ack=True)
        ready.set()
        while not arrivals.stop.is_set():
            try:
                connection.drain_events(timeout=0.2)
            except TimeoutError:
                continue
    finally:
        connection.release()


def watch_with_idle(
    host: str,
    port: int,
    user: str,
    password: str,
    arrivals: Arrivals,
    ready: threading.Event,
) -> None:
    with IMAPClient(host, port, ssl=False, timeout=30) as client:
        client.login(user, password)
        status = client.select_folder("INBOX", readonly=True)
        next_uid = int(status[b"UIDNEXT"])
        client.idle()
        ready.set()
        while not arrivals.stop.is_set():
            responses = client.idle_check(timeout=0.2)
            if not any(isinstance(r, tuple) and b"EXISTS" in r for r in responses):
                continue
            client.idle_done()
            found = client.search(["UID", f"{next_uid}:*"])
            uids = [uid for uid in found if uid >= next_uid]
            fetched = client.fetch(uids, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
            for uid, data in fetched.items():
                header = next(iter(v for k, v in data.items() if k.startswith(b"BODY")))
                arrivals.record(header.decode().partition(":")[2])
                next_uid = max(next_uid, uid + 1)
            client.idle()
        client.idle_done()


def _wait_for(service: Service, event: str) -> None:
    deadline = time.monotonic() + START_SECONDS
    while not any(line.get("event") == event for line in service.lines()):
        if not service.alive() or time.monotonic() > deadline:
            raise RuntimeError(
                f"the {service.name} did not log {event!r}; see {service.log_path}"
            )
        time.sleep(0.1)


def run(env: BenchEnv) -> list[Figure]:
    count = 30 if env.quick else 100
    dovecot = env.dovecot
    user, password = add_user(dovecot, "latency")
    imap_channel(env, "latency", user, password, idle=True, active=True)
    connection = env.broker()
    try:
        env.purge(connection, env.topology.raw_queue, *env.campaign_queues())
    finally:
        connection.release()

    process_env = service_env(env.settings, MAILROOM_POLL_INTERVAL_SECONDS="30")
    services: list[Service] = []
    threads: list[threading.Thread] = []
    routed, bare = Arrivals(), Arrivals()
    sent: dict[str, float] = {}
    try:
        for name in ("router", "poller"):
            services.append(Service(name, process_env, env.logs))
        router, poller = services
        _wait_for(router, "consuming")
        _wait_for(poller, "watching with IDLE")

        consuming, idling = threading.Event(), threading.Event()
        threads += [
            routed.thread(
                lambda: consume_routed(
                    env.topology.campaign_queue("general"), routed, consuming
                ),
                "routed-consumer",
            ),
            bare.thread(
                lambda: watch_with_idle(
                    dovecot.host, dovecot.imap_port, user, password, bare, idling
                ),
                "bare-idle",
            ),
        ]
        for thread in threads:
            thread.start()
        if not (consuming.wait(30) and idling.wait(30)):
            raise RuntimeError(
                "the consumers did not start: " + "; ".join(routed.errors + bare.errors)
            )

        _append(
            dovecot.host, dovecot.imap_port, user, password, count, sent, env.run_id
        )
        deadline = time.monotonic() + SETTLE_SECONDS
        while time.monotonic() < deadline and not (
            set(sent) <= set(routed.seen) and set(sent) <= set(bare.seen)
        ):
            time.sleep(0.1)
    finally:
        routed.stop.set()
        bare.stop.set()
        for thread in threads:
            if thread.is_alive():
                thread.join(5)
        for service in services:
            service.stop()

    ours = [routed.seen[m] - sent[m] for m in sent if m in routed.seen]
    theirs = [bare.seen[m] - sent[m] for m in sent if m in bare.seen]
    if len(ours) < 2 or len(theirs) < 2:
        raise RuntimeError(
            f"{len(ours)} of {count} routed and {len(theirs)} seen by IDLE; "
            + "; ".join(routed.errors + bare.errors)
        )

    note = (
        f"{count} messages appended one at a time, 50-250 ms apart; poller and "
        "router as separate processes; polling interval 30 s"
    )
    missing = count - len(ours)
    if missing:
        note += f"; {missing} not routed within {SETTLE_SECONDS:g} s of the last"
    figures = []
    for label, cut in (("p50", 49), ("p99", 98)):
        figures.append(
            Figure(
                f"new mail -> RoutedEmail consumed, {label}",
                _quantile(ours, cut),
                Unit.SECONDS,
                f"bare IMAP IDLE client fetches it, {label}",
                _quantile(theirs, cut),
                note=note if label == "p50" else "",
            )
        )
    return figures


def _append(
    host: str,
    port: int,
    user: str,
    password: str,
    count: int,
    sent: dict[str, float],
    tag: str,
) -> None:
    rng = random.Random(5)
    with IMAPClient(host, port, ssl=False, timeout=30) as client:
        client.login(user, password)
        for number in range(count):
            token = f"latency-{tag}-{number}"
            raw = small_message(token)
            sent[f"{token}@bench.example"] = time.perf_counter()
            client.append("INBOX", raw)
            time.sleep(rng.uniform(0.05, 0.25))


def _quantile(values: list[float], cut: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[cut]
