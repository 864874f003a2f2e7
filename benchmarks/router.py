"""Router throughput per worker, next to a parse-only and a relay-only loop.

The raw queue is filled beforehand with RawEmail messages built as the poller
builds them, spread over four channels of 50 filters each (contains, does not
contain and regular expressions on sender, subject and body, most of which
match nothing, so that most mail is tried against most filters). A real
Router then consumes them on this process's main thread: it parses, routes,
publishes RoutedEmail with confirms, records what it routed and acknowledges.

Baselines, on the same messages:
  - parse only: the standard library's modern parser
    (``BytesParser(policy=email.policy.default)``, ``get_body``,
    ``iter_attachments``) in a bare loop;
  - relay only: consume from one queue, publish each body to another with
    confirms, acknowledge; plain py-amqp, no parsing, no database.
"""

from __future__ import annotations

import email.policy
import time
from email.parser import BytesParser

import amqp

from benchmarks.environment import BenchEnv
from benchmarks.report import Figure, Target, Unit
from benchmarks.workers import WorkerRun, bounded, fill, run_until_handled
from services.router.worker import Router
from shared.metrics import Outcome
from shared.models import MailSource, Payload, Protocol, RawEmail
from shared.topology import RAW_KEY

CHANNELS = 4
CAMPAIGNS = ("general", "billing", "refunds", "urgent", "orders", "support")
TARGET_RATE = 1500.0


def filter_rules() -> list[tuple[str, str, str, str]]:
    """50 filters: (field, operator, value, campaign); the last five match often."""
    fields = ("sender", "subject", "body")
    rules = []
    for position in range(1, 46):
        field = fields[position % 3]
        if position % 10 == 0:
            value = rf"\b(?:case|ticket)[ -]#?{position}\d{{5}}\b"
            rules.append((field, "regex", value, "support"))
        elif position % 10 == 5:
            rules.append(("sender", "not_contains", "@", "support"))
        else:
            rules.append((field, "contains", f"ref-{position:03d}-", "orders"))
    rules += [
        ("subject", "contains", "refund", "refunds"),
        ("subject", "contains", "invoice", "billing"),
        ("body", "contains", "urgent", "urgent"),
        ("sender", "contains", "@example.order", "orders"),
        ("subject", "contains", "support", "support"),
    ]
    return rules


def set_up_channels(env: BenchEnv, name: str) -> list[int]:
    """Channels with the 50 filters; returns their ids."""
    with env.connect_db() as conn:
        env.add_campaigns(conn, *CAMPAIGNS)
        catalog = env.catalog(conn)
        ids = []
        for number in range(CHANNELS):
            channel = catalog.add_channel(
                f"{name}-{number}",
                address=f"support{number}@bench.example",
                default_campaign="general",
            )
            for field, operator, value, campaign in filter_rules():
                catalog.add_filter(channel.id, field, value, campaign, operator)
            ids.append(channel.id)
    return ids


def raw_bodies(messages: list[bytes], channel_ids: list[int]) -> list[bytes]:
    bodies = []
    for number, data in enumerate(messages):
        raw = RawEmail(
            channel_id=channel_ids[number % len(channel_ids)],
            source=MailSource(
                protocol=Protocol.IMAP, folder="INBOX", uidvalidity=1, uid=number + 1
            ),
            raw=Payload.of(data),
        )
        bodies.append(raw.to_json())
    return bodies


def route(env: BenchEnv, bodies: list[bytes], profile_name: str | None) -> WorkerRun:
    connection = env.broker()
    try:
        fill(connection, env.topology.raw_exchange, RAW_KEY, bodies)
        profile = (
            env.profile_dir / profile_name if env.profile_dir and profile_name else None
        )
        run = run_until_handled(
            Router(env.settings), len(bodies), timeout=180, profile=profile
        )
        env.purge(connection, env.topology.raw_queue, *env.campaign_queues())
    finally:
        connection.release()
    return run


def stdlib_rate(messages: list[bytes], seconds: float) -> float:
    parser = BytesParser(policy=email.policy.default)
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for raw in messages:
            message = parser.parsebytes(raw)
            message.get_body(preferencelist=("plain", "html"))
            list(message.iter_attachments())
            done += 1
            if time.perf_counter() - started >= seconds:
                break
    return done / (time.perf_counter() - started)


def relay_rate(env: BenchEnv, bodies: list[bytes]) -> float:
    """Consume, publish with confirms, acknowledge: the broker's share alone."""
    prefetch = env.settings.prefetch
    connection = env.broker()
    try:
        source = env.bench_queue(connection, "relay-in")
        target = env.bench_queue(connection, "relay-out")
        fill(connection, "", source, bodies)

        consumer = connection.channel()
        consumer.basic_qos(0, prefetch, False)
        buffer: list[amqp.Message] = []
        consumer.basic_consume(source, callback=buffer.append)
        publisher = connection.channel()
        publisher.confirm_select()
        confirmed = [0]

        def on_ack(delivery_tag: int, multiple: bool) -> None:
            confirmed[0] = max(confirmed[0], delivery_tag)

        publisher.events["basic_ack"].add(on_ack)

        def relay() -> float:
            published = 0
            started = time.perf_counter()
            while published < len(bodies):
                if not buffer:
                    connection.drain_events(timeout=5)
                while len(buffer) < prefetch:
                    try:
                        connection.drain_events(timeout=0.001)
                    except TimeoutError:
                        break
                batch = buffer[:]
                buffer.clear()
                if not batch:
                    # The frame read was a late confirm, not a delivery.
                    continue
                for message in batch:
                    publisher.basic_publish(
                        amqp.Message(message.body, delivery_mode=2),
                        exchange="",
                        routing_key=target,
                    )
                published += len(batch)
                while confirmed[0] < published:
                    connection.drain_events(timeout=5)
                consumer.basic_ack(batch[-1].delivery_tag, multiple=True)
            return len(bodies) / (time.perf_counter() - started)

        rate = bounded(180, relay)
        env.purge(connection, source, target)
    finally:
        connection.release()
    return rate


def run(env: BenchEnv) -> list[Figure]:
    count = 1_500 if env.quick else 6_000
    mix = env.mail
    channel_ids = set_up_channels(env, "router")
    bodies = raw_bodies(mix.copies(count, f"router-{env.run_id}"), channel_ids)

    measured = route(env, bodies, None)
    if env.profile_dir is not None:
        again = mix.copies(count // 2, f"router-profile-{env.run_id}")
        route(env, raw_bodies(again, channel_ids), "router")

    parse_only = stdlib_rate(mix.distinct, 2.0 if env.quick else 5.0)
    relay_only = relay_rate(env, bodies)

    note = (
        f"{measured.handled} messages ({mix.describe()}), 4 channels of 50 "
        "filters, prefetch " + str(env.settings.prefetch)
    )
    return [
        Figure(
            "router throughput, 1 worker",
            measured.rate,
            Unit.RATE,
            "stdlib parse only (policy.default)",
            parse_only,
            Target.value_at_least(TARGET_RATE),
            note=f"{note}; {measured.note(Outcome.ROUTED)}",
        ),
        Figure(
            "router throughput, 1 worker",
            measured.rate,
            Unit.RATE,
            "bare consume+publish+ack relay",
            relay_only,
            Target.value_at_least(TARGET_RATE),
        ),
    ]
