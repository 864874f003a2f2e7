"""Start-up and shutdown shared by every service process."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Protocol

from shared import db
from shared.logs import configure_logging, get_logger
from shared.metrics import Stage, precreate, serve_metrics
from shared.settings import Settings, get_settings

log = get_logger(__name__)

DEFAULT_METRICS_PORTS = {"poller": 9101, "router": 9102, "sender": 9103}


def run_service(
    name: str,
    settings: Settings,
    run: Callable[[threading.Event], None],
    ready: Callable[[], bool],
) -> None:
    """Serve metrics, run until SIGTERM or SIGINT, then let ``run`` finish."""
    configure_logging(name, settings.log_level)
    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    port = settings.metrics_port
    if port is None:
        port = DEFAULT_METRICS_PORTS.get(name, 0)
    if port:
        try:
            server = serve_metrics(settings.metrics_host, port, ready)
        except OSError as exc:
            log.error(
                "cannot serve metrics; choose a free port with "
                "MAILROOM_METRICS_PORT (0 turns metrics off)",
                address=f"{settings.metrics_host}:{port}",
                error=str(exc),
            )
            raise SystemExit(1) from exc
        log.info("metrics served", url=f"http://{settings.metrics_host}:{port}/metrics")
    else:
        server = None

    log.info("starting", broker_prefix=settings.broker_prefix)
    try:
        run(stop)
    finally:
        if server is not None:
            server.shutdown()


class Worker(Protocol):
    ready: threading.Event

    def run(self, stop: threading.Event) -> None: ...


def run_worker(name: str, factory: Callable[[Settings], Worker]) -> None:
    """The ``main`` of a service: settings, schema, then the worker until stopped."""
    settings = get_settings()
    configure_logging(name, settings.log_level)
    db.create_database_if_missing(settings.database_url.get_secret_value())
    applied = db.migrate(settings.database_url.get_secret_value())
    if applied:
        log.info("database migrated", migrations=applied)
    precreate(Stage(name))
    worker = factory(settings)
    run_service(name, settings, worker.run, worker.ready.is_set)
