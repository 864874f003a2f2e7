"""Sender throughput to a local SMTP sink, next to a bare smtplib loop.

The outbound queue is filled with agents' replies (text, HTML in most, a
small attachment in one in five), published as a campaign system would. A
real Sender consumes them on this process's main thread: it claims each
idempotency key in PostgreSQL, composes and checks the MIME message, sends it
over one reused plain SMTP connection, records the outcome and publishes a
DeliveryStatus. The baseline sends the very messages compose() built for the
same replies, ready-made, with smtplib over one connection. The sink runs in
a process of its own; its CPU share shows whether it set the pace.
"""

from __future__ import annotations

import smtplib
import time

from benchmarks.environment import BenchEnv
from benchmarks.mail import replies
from benchmarks.report import Figure, Target, Unit
from benchmarks.sink import SmtpSink
from benchmarks.workers import WorkerRun, bounded, fill, run_until_handled
from services.sender.compose import compose, message_id_for, recipients
from services.sender.worker import Sender
from shared.catalog import Channel
from shared.metrics import Outcome
from shared.models import Address, OutboundEmail
from shared.topology import OUTBOUND_KEY

TARGET_RATIO = 0.8


def smtp_channel(env: BenchEnv, name: str) -> Channel:
    sink = env.sink
    with env.connect_db() as conn:
        return env.catalog(conn).add_channel(
            name,
            address="support@bench.example",
            outbound={
                "type": "smtp",
                "host": sink.host,
                "port": sink.port,
                "security": "none",
                "username": "bench",
            },
        )


def send(
    env: BenchEnv, emails: list[OutboundEmail], profile_name: str | None
) -> WorkerRun:
    connection = env.broker()
    try:
        fill(
            connection,
            env.topology.outbound_exchange,
            OUTBOUND_KEY,
            [email.to_json() for email in emails],
        )
        profile = (
            env.profile_dir / profile_name if env.profile_dir and profile_name else None
        )
        run = run_until_handled(
            Sender(env.settings), len(emails), timeout=180, profile=profile
        )
        env.purge(connection, env.topology.outbound_queue, env.topology.status_queue)
    finally:
        connection.release()
    return run


def prebuilt(
    channel: Channel, emails: list[OutboundEmail], limit: int
) -> list[tuple[list[str], bytes]]:
    domain = channel.address.rpartition("@")[2]
    sender = Address(name=channel.name, email=channel.address)
    built = []
    for email in emails:
        data = compose(
            email,
            sender=sender,
            attachments=[(a, a.content.data or b"") for a in email.attachments],
            message_id=message_id_for(email.idempotency_key, domain),
            attachment_limit=limit,
        )
        built.append((recipients(email), data))
    return built


def smtplib_rate(
    sink: SmtpSink, sender: str, messages: list[tuple[list[str], bytes]]
) -> float:
    def loop() -> float:
        with smtplib.SMTP(sink.host, sink.port, timeout=60) as smtp:
            smtp.ehlo()
            started = time.perf_counter()
            for to, data in messages:
                smtp.sendmail(sender, to, data)
            return len(messages) / (time.perf_counter() - started)

    return bounded(300, loop)


def run(env: BenchEnv) -> list[Figure]:
    count = 500 if env.quick else 3_000
    channel = smtp_channel(env, "sender")
    emails = replies(count, channel.id, f"send-{env.run_id}")
    sink = env.sink

    cpu = sink.cpu_seconds()
    measured = send(env, emails, None)
    sender_busy = (sink.cpu_seconds() - cpu) / measured.seconds

    if env.profile_dir is not None:
        send(
            env, replies(count // 2, channel.id, f"send-profile-{env.run_id}"), "sender"
        )

    messages = prebuilt(channel, emails, env.settings.attachment_limit_bytes)
    size = sum(len(data) for _to, data in messages) / len(messages)
    cpu = sink.cpu_seconds()
    started = time.perf_counter()
    baseline = smtplib_rate(sink, channel.address, messages)
    baseline_busy = (sink.cpu_seconds() - cpu) / (time.perf_counter() - started)

    note = (
        f"{measured.handled} replies, {size / 1024:.0f} KB on average as sent; "
        f"SMTP sink CPU busy {sender_busy:.0%} during the Sender, "
        f"{baseline_busy:.0%} during the smtplib loop"
    )
    return [
        Figure(
            "sender throughput, 1 worker",
            measured.rate,
            Unit.RATE,
            "smtplib loop, same messages pre-built",
            baseline,
            Target.ratio_at_least(TARGET_RATIO),
            note=f"{note}; {measured.note(Outcome.SENT)}",
        )
    ]
