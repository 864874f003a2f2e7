"""One memory measurement in a fresh process: `python -m benchmarks.memory`.

Arguments: ROLE (router, sender, poller), MODE (rss, traced) and a JSON job
naming the channel and the stored blob. The worker first handles one small
message, so that imports, connections and caches are in place, and then the
large one; the result, one JSON line on stdout, is the growth while handling
it: of the resident set (its peak minus its size just before) in ``rss``
mode, of Python's allocations (tracemalloc's peak) in ``traced`` mode.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable
from typing import Any

from benchmarks.mail import reply_with_attachment, small_message
from benchmarks.workers import handled_counts
from shared import broker
from shared.broker import Outgoing, Publisher
from shared.catalog import Catalog
from shared.models import (
    Address,
    MailSource,
    OutboundEmail,
    Payload,
    Protocol,
    RawEmail,
)
from shared.settings import Settings
from shared.topology import OUTBOUND_KEY, RAW_KEY, Topology

WAIT_SECONDS = 120.0


class Memory:
    """Resident-set growth, or tracemalloc's peak, from ``start`` on.

    The resident peak is the kernel's high-water mark (VmHWM), reset at
    ``start`` through /proc/self/clear_refs; ru_maxrss would not do, as Linux
    carries it over from the parent process across fork and exec.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.resident_before = 0

    def start(self) -> None:
        gc.collect()
        if self.mode == "traced":
            tracemalloc.start()
            return
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        self.resident_before = _status("VmRSS")

    def growth(self) -> int:
        if self.mode == "traced":
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            return peak
        return max(0, _status("VmHWM") - self.resident_before)


def _status(field: str) -> int:
    """A memory figure of /proc/self/status, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _measure_worker(
    worker: Any, memory: Memory, warm: Outgoing, big: Outgoing, settings: Settings
) -> int:
    """Run the worker; feed it the small message, then the large one."""
    stop = threading.Event()
    result: dict[str, int] = {}
    connection = broker.connect(settings.amqp_url.get_secret_value(), attempts=3)
    publisher = Publisher(connection)

    def handled() -> int:
        return sum(handled_counts(worker.stage).values())

    def until(count: int) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while handled() < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {worker.stage} handled {handled()} of {count}")
            time.sleep(0.01)

    def feed() -> None:
        try:
            if not worker.ready.wait(60):
                raise TimeoutError(f"the {worker.stage} did not start")
            publisher.publish_all([warm])
            until(1)
            memory.start()
            publisher.publish_all([big])
            until(2)
            result["growth"] = memory.growth()
        finally:
            stop.set()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    worker.run(stop)
    feeder.join(10)
    connection.release()
    if "growth" not in result:
        raise RuntimeError("the large message was not handled; see this log")
    return result["growth"]


def _child_router(settings: Settings, memory: Memory, job: dict[str, Any]) -> int:
    from services.router.worker import Router

    topology = Topology(prefix=settings.broker_prefix)

    def raw_email(uid: int, payload: Payload) -> Outgoing:
        raw = RawEmail(
            channel_id=job["channel_id"],
            source=MailSource(
                protocol=Protocol.IMAP, folder="Big", uidvalidity=1, uid=uid
            ),
            raw=payload,
        )
        return Outgoing(topology.raw_exchange, RAW_KEY, raw.to_json(), str(raw.id))

    warm = raw_email(1, Payload.of(small_message(uuid.uuid4().hex)))
    big = raw_email(2, Payload(sha256=job["sha256"], size=job["size"]))
    return _measure_worker(Router(settings), memory, warm, big, settings)


def _child_sender(settings: Settings, memory: Memory, job: dict[str, Any]) -> int:
    from services.sender.worker import Sender

    topology = Topology(prefix=settings.broker_prefix)

    def outbound(email: OutboundEmail) -> Outgoing:
        return Outgoing(
            topology.outbound_exchange,
            OUTBOUND_KEY,
            email.to_json(),
            email.idempotency_key,
        )

    key = job["key"]
    warm = outbound(
        OutboundEmail(
            idempotency_key=f"{key}-warm",
            channel_id=job["channel_id"],
            to=[Address(email="customer@example.org")],
            subject="Warm-up",
            text_body="Hello",
        )
    )
    payload = Payload(sha256=job["sha256"], size=job["size"])
    big = outbound(reply_with_attachment(job["channel_id"], key, payload))
    return _measure_worker(Sender(settings), memory, warm, big, settings)


def _child_poller(settings: Settings, memory: Memory, job: dict[str, Any]) -> int:
    from services.poller.worker import Poller
    from shared import db
    from shared.secrets import SecretBox

    poller = Poller(settings)
    connection = broker.connect(settings.amqp_url.get_secret_value(), attempts=3)
    try:
        with db.connect(settings.database_url.get_secret_value()) as conn:
            poller.db = conn
            poller.catalog = Catalog(conn, SecretBox(settings.secret_keys))
            poller.publisher = Publisher(connection)
            if poller.poll_channel(job["warm"]) != 1:
                raise RuntimeError("the warm-up message was not published")
            memory.start()
            if poller.poll_channel(job["big"]) != 1:
                raise RuntimeError("the large message was not published")
            return memory.growth()
    finally:
        connection.release()


CHILDREN: dict[str, Callable[[Settings, Memory, dict[str, Any]], int]] = {
    "router": _child_router,
    "sender": _child_sender,
    "poller": _child_poller,
}


def child(role: str, mode: str, job: dict[str, Any]) -> None:
    from shared.logs import configure_logging

    configure_logging(f"bench-large-{role}")
    settings = Settings()
    growth = CHILDREN[role](settings, Memory(mode), job)
    print(json.dumps({"growth": growth}), flush=True)


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
