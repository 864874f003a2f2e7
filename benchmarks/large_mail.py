"""Large mail: memory of one 20 MB attachment through poller, router and sender.

Each measurement runs in a fresh process (``benchmarks/memory.py``), once
for the growth of the resident set and once for tracemalloc's peak of Python
allocations. The target is at most 3x the message's size.

The messages travel as the product sends them: the raw mail by claim check
(stored in PostgreSQL, a reference on the broker), the reply's attachment
likewise. Every body the workers published is read back from its queue to
check that none comes near RabbitMQ's 16 MiB default message limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from benchmarks.environment import BenchEnv
from benchmarks.mail import large_message, reply_with_attachment, small_message
from benchmarks.mailbox import add_user, fill, imap_channel
from benchmarks.report import MIB, Figure, Target, Unit
from benchmarks.router import set_up_channels
from benchmarks.sender import smtp_channel
from services.sender.compose import compose, message_id_for
from shared import blobs
from shared.models import Address

ATTACHMENT_BYTES = 20_000_000
BROKER_LIMIT = 16 * MIB
MODES = ("rss", "traced")
CHILD_SECONDS = 300


def run(env: BenchEnv) -> list[Figure]:
    figures: list[Figure] = []
    published: list[int] = []
    raw = large_message(ATTACHMENT_BYTES)

    figures += _router(env, raw, published)
    figures += _sender(env, published)
    figures += _poller(env, raw, published)

    figures.append(
        Figure(
            "largest broker message body published",
            float(max(published)),
            Unit.BYTES,
            "the raw message, were it inline",
            float(len(raw)),
            Target.value_below(BROKER_LIMIT),
            note=(
                f"{len(published)} bodies read back from the raw, campaign and "
                "delivery-status queues; RabbitMQ refuses bodies over 16 MiB "
                "by default (max_message_size)"
            ),
        )
    )
    return figures


def _router(env: BenchEnv, raw: bytes, published: list[int]) -> list[Figure]:
    channel_id = set_up_channels(env, "large")[0]
    with env.connect_db() as conn:
        payload = blobs.put(conn, raw, inline_max=env.settings.inline_max_bytes)

    results = {}
    for mode in MODES:
        with env.connect_db() as conn:
            conn.execute("DELETE FROM routed_messages")
        results[mode] = _child(
            env,
            "router",
            mode,
            {"channel_id": channel_id, "sha256": payload.sha256, "size": payload.size},
        )
        published += _bodies(env, env.campaign_queues())
    return _figures("router", results, len(raw), "raw message")


def _sender(env: BenchEnv, published: list[int]) -> list[Figure]:
    channel = smtp_channel(env, "large-sender")
    limit = env.settings.attachment_limit_bytes
    data = os.urandom(limit - 64 * 1024)
    with env.connect_db() as conn:
        payload = blobs.put(conn, data, inline_max=env.settings.inline_max_bytes)

    email = reply_with_attachment(channel.id, "size", payload)
    sent = compose(
        email,
        sender=Address(name=channel.name, email=channel.address),
        attachments=[(email.attachments[0], data)],
        message_id=message_id_for(email.idempotency_key, "bench.example"),
        attachment_limit=limit,
    )
    del data

    results = {}
    for mode in MODES:
        results[mode] = _child(
            env,
            "sender",
            mode,
            {
                "channel_id": channel.id,
                "sha256": payload.sha256,
                "size": payload.size,
                "key": f"large-{mode}-{env.run_id}",
            },
        )
        published += _bodies(env, [env.topology.status_queue])
    return _figures("sender", results, len(sent), "message as sent")


def _poller(env: BenchEnv, raw: bytes, published: list[int]) -> list[Figure]:
    dovecot = env.dovecot
    user, password = add_user(dovecot, "large")
    fill(dovecot, user, [small_message(f"warm-{env.run_id}")])
    fill(dovecot, user, [raw], folder="Big")
    warm = imap_channel(env, "large-warm", user, password)
    big = imap_channel(env, "large-big", user, password, folder="Big")

    results = {}
    for mode in MODES:
        with env.connect_db() as conn:
            conn.execute("DELETE FROM mailbox_checkpoints")
        results[mode] = _child(env, "poller", mode, {"warm": warm.id, "big": big.id})
        published += _bodies(env, [env.topology.raw_queue])
    return _figures("poller", results, len(raw), "raw message")


def _figures(
    role: str, results: dict[str, dict[str, Any]], size: int, what: str
) -> list[Figure]:
    target = Target.ratio_at_most(3.0)
    return [
        Figure(
            f"{role}: resident memory growth, {size / MIB:.0f} MiB mail",
            float(results["rss"]["growth"]),
            Unit.BYTES,
            f"size of the {what}",
            float(size),
            target,
        ),
        Figure(
            f"{role}: peak of Python allocations (tracemalloc)",
            float(results["traced"]["growth"]),
            Unit.BYTES,
            f"size of the {what}",
            float(size),
            target,
        ),
    ]


def _child(env: BenchEnv, role: str, mode: str, job: dict[str, Any]) -> dict[str, Any]:
    settings = env.settings
    child_env = dict(os.environ)
    child_env.update(
        MAILROOM_DATABASE_URL=settings.database_url.get_secret_value(),
        MAILROOM_AMQP_URL=settings.amqp_url.get_secret_value(),
        MAILROOM_BROKER_PREFIX=settings.broker_prefix,
        MAILROOM_SECRET_KEYS=env.secret_key,
        MAILROOM_METRICS_PORT="0",
    )
    log = env.logs / f"large-{role}-{mode}.log"
    with log.open("ab") as stderr:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.memory",
                role,
                mode,
                json.dumps(job),
            ],
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            timeout=CHILD_SECONDS,
            check=False,
        )
    lines = done.stdout.decode().strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the {role} measurement ({mode}) failed; see {log}")
    return dict(json.loads(lines[-1]))


def _bodies(env: BenchEnv, queues: list[str]) -> list[int]:
    """Take every message off the queues; the size of each body."""
    sizes = []
    connection = env.broker()
    try:
        channel = connection.channel()
        for queue in queues:
            while (message := channel.basic_get(queue, no_ack=True)) is not None:
                sizes.append(len(message.body))
    finally:
        connection.release()
    return sizes
