"""Feed a real worker and run it on the main thread until it has handled enough.

``fill`` puts the messages on the worker's queue beforehand. The worker's own
loop then runs as in production (``run(stop)``); a small thread watches the
``mailroom_messages_total`` counter the worker keeps anyway and sets ``stop``
once enough messages are done, or when time runs out. Timing starts when the
worker says it is ready, that is consuming. With a profile directory the
worker runs under pyinstrument, which samples the main thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kombu import Connection
from prometheus_client import REGISTRY

from shared.broker import Outgoing, Publisher
from shared.metrics import Outcome, Stage
from shared.worker import ConsumerWorker

READY_SECONDS = 60.0
WATCH_INTERVAL = 0.02

T = TypeVar("T")


@dataclass(frozen=True)
class WorkerRun:
    handled: int
    seconds: float
    cpu_seconds: float
    outcomes: dict[str, int]
    finished: bool

    @property
    def rate(self) -> float:
        return self.handled / self.seconds if self.seconds else 0.0

    def note(self, expected_outcome: Outcome) -> str:
        """What a reader should know: the CPU share (near 100% means the worker,
        not the broker or the database, set the pace) and unexpected outcomes."""
        parts = [f"worker process CPU busy {self.cpu_seconds / self.seconds:.0%}"]
        if not self.finished:
            parts.append(f"stopped by its time limit after {self.handled} messages")
        others = {k: v for k, v in self.outcomes.items() if k != expected_outcome and v}
        if others:
            parts.append(
                "outcomes besides "
                + expected_outcome.value
                + ": "
                + ", ".join(f"{v} {k}" for k, v in sorted(others.items()))
            )
        return "; ".join(parts)


def fill(connection: Connection, exchange: str, key: str, bodies: list[bytes]) -> None:
    """Publish the bodies for a worker to consume, 500 to a confirm."""
    publisher = Publisher(connection, confirm_timeout=120)
    for start in range(0, len(bodies), 500):
        publisher.publish_all(
            [
                Outgoing(exchange, key, body, message_id=str(start + n))
                for n, body in enumerate(bodies[start : start + 500])
            ]
        )


def handled_counts(stage: Stage) -> dict[str, int]:
    counts = {}
    for outcome in Outcome:
        value = REGISTRY.get_sample_value(
            "mailroom_messages_total", {"stage": stage.value, "outcome": outcome.value}
        )
        counts[outcome.value] = int(value or 0)
    return counts


def run_until_handled(
    worker: ConsumerWorker,
    expected: int,
    *,
    timeout: float,
    profile: Path | None = None,
) -> WorkerRun:
    stop = threading.Event()
    before = handled_counts(worker.stage)
    result: dict[str, Any] = {}

    def done() -> dict[str, int]:
        now = handled_counts(worker.stage)
        return {k: now[k] - before[k] for k in now}

    def watch() -> None:
        try:
            ready_by = time.monotonic() + READY_SECONDS
            while not worker.ready.wait(0.1):
                if stop.is_set() or time.monotonic() > ready_by:
                    return
            started = time.perf_counter()
            cpu = time.process_time()
            deadline = started + timeout
            counts = done()
            while sum(counts.values()) < expected and time.perf_counter() < deadline:
                if stop.is_set():
                    break
                time.sleep(WATCH_INTERVAL)
                counts = done()
            result.update(
                seconds=time.perf_counter() - started,
                cpu_seconds=time.process_time() - cpu,
                counts=counts,
            )
        finally:
            stop.set()

    watcher = threading.Thread(target=watch, name="bench-watch", daemon=True)
    watcher.start()
    try:
        with profiling(profile):
            worker.run(stop)
    finally:
        stop.set()
        watcher.join(10)

    if "seconds" not in result:
        raise RuntimeError(
            f"the {worker.stage} did not start consuming within {READY_SECONDS:g} s"
        )
    counts = result["counts"]
    handled = sum(counts.values())
    return WorkerRun(
        handled, result["seconds"], result["cpu_seconds"], counts, handled >= expected
    )


@contextmanager
def profiling(path: Path | None) -> Iterator[None]:
    """Profile the block with pyinstrument into ``path`` (.txt, .html, .pyisession)."""
    if path is None:
        yield
        return

    from pyinstrument import Profiler

    profiler = Profiler(interval=0.001)
    profiler.start()
    try:
        yield
    finally:
        profiler.stop()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".txt").write_text(
            profiler.output_text(unicode=True, color=False, show_all=False)
        )
        path.with_suffix(".html").write_text(profiler.output_html())
        if profiler.last_session is not None:
            # `pyinstrument --load FILE -r text --show-all` renders it again.
            profiler.last_session.save(str(path.with_suffix(".pyisession")))


def bounded(seconds: float, action: Callable[[], T]) -> T:
    """Run ``action`` in a daemon thread; give up on it after ``seconds``.

    For broker calls that could block for ever (a publisher whose confirms
    are never read fills its socket buffer): the run goes on and reports it.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = action()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="bench-bounded", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"did not finish within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
