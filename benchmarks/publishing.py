"""Publishing with pipelined confirms against one round trip per message.

``Publisher.publish_all`` sends a whole batch of persistent 2 KB messages and
then waits once for the broker's confirms; the baseline waits for the confirm
of each message before sending the next, as a naive publisher would. Both go
from one process over one connection to a durable queue of the benchmark's.
"""

from __future__ import annotations

import os
import time
from base64 import b64encode

from benchmarks.environment import BenchEnv
from benchmarks.report import Figure, Target, Unit
from benchmarks.workers import bounded
from shared.broker import Outgoing, Publisher

BODY_BYTES = 2048
TARGET_RATE = 5000.0


def body() -> bytes:
    return b64encode(os.urandom(BODY_BYTES))[:BODY_BYTES]


def run(env: BenchEnv) -> list[Figure]:
    count = 10_000 if env.quick else 50_000
    seconds = 2.0 if env.quick else 5.0
    data = body()
    connection = env.broker()
    try:
        queue = env.bench_queue(connection, "publish")
        batch = [Outgoing("", queue, data, message_id=str(n)) for n in range(count)]
        publisher = Publisher(connection, confirm_timeout=120)

        def pipelined() -> float:
            started = time.perf_counter()
            publisher.publish_all(batch)
            return count / (time.perf_counter() - started)

        rate = bounded(300, pipelined)
        env.purge(connection, queue)

        def one_by_one() -> float:
            done = 0
            started = time.perf_counter()
            while time.perf_counter() - started < seconds and done < count:
                publisher.publish(batch[done])
                publisher.wait()
                done += 1
            return done / (time.perf_counter() - started)

        baseline = bounded(seconds + 60, one_by_one)
        env.purge(connection, queue)
    finally:
        connection.release()

    return [
        Figure(
            f"publish_all, {count:,} persistent 2 KB",
            rate,
            Unit.RATE,
            "publish + wait for confirm, each",
            baseline,
            Target.value_at_least(TARGET_RATE),
        )
    ]
