"""Prometheus metrics of every service, and the HTTP endpoint that serves them.

Label values come from closed sets (the enums below); the channel id is the
only per-entity label, so series grow with the number of channels only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from enum import StrEnum
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.exposition import MetricsHandler


class Outcome(StrEnum):
    PUBLISHED = "published"
    ROUTED = "routed"
    DUPLICATE = "duplicate"
    QUARANTINED = "quarantined"
    SKIPPED = "skipped"
    SENT = "sent"
    RETRYING = "retrying"
    FAILED = "failed"


class Stage(StrEnum):
    POLLER = "poller"
    ROUTER = "router"
    SENDER = "sender"


MESSAGES = Counter(
    "mailroom_messages_total",
    "Messages handled, by service stage and outcome.",
    ["stage", "outcome"],
)
HANDLE_SECONDS = Histogram(
    "mailroom_handle_seconds",
    "Time to handle one message, by stage.",
    ["stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 30),
)
PUBLISH_CONFIRM_SECONDS = Histogram(
    "mailroom_publish_confirm_seconds",
    "Time from publishing a batch to the broker confirming all of it.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)
MESSAGE_BYTES = Histogram(
    "mailroom_inbound_message_bytes",
    "Size of fetched raw messages.",
    buckets=(1e3, 1e4, 5e4, 1e5, 1e6, 5e6, 2e7, 5e7),
)
CHANNEL_MESSAGES = Counter(
    "mailroom_channel_messages_total",
    "Messages fetched or sent per channel and direction.",
    ["channel_id", "direction"],
)
POLLS = Counter(
    "mailroom_polls_total",
    "Mailbox polls per channel, by result.",
    ["channel_id", "result"],
)
LAST_POLL_SUCCESS = Gauge(
    "mailroom_channel_last_successful_poll_timestamp_seconds",
    "Unix time of the last poll of a channel that succeeded.",
    ["channel_id"],
)
CONSECUTIVE_FAILURES = Gauge(
    "mailroom_channel_consecutive_failures",
    "Polls of a channel that failed in a row.",
    ["channel_id"],
)
LOOP_SUSPECTED = Counter(
    "mailroom_loop_suspected_messages_total",
    "Messages routed with the loop_suspected flag, per channel.",
    ["channel_id"],
)
QUARANTINED = Counter(
    "mailroom_quarantined_total",
    "Messages put in quarantine, by stage.",
    ["stage"],
)


CREDENTIAL_EXPIRY = Gauge(
    "mailroom_channel_credential_expiry_timestamp_seconds",
    "Unix time at which a channel's credential expires, by kind of credential.",
    ["channel_id", "credential"],
)
QUARANTINE_WAITING = Gauge(
    "mailroom_quarantine_messages",
    "Messages in quarantine not yet replayed, by stage.",
    ["stage"],
)


class Credential(StrEnum):
    CLIENT_SECRET = "client_secret"  # noqa: S105 - a label, not a secret
    REFRESH_TOKEN = "refresh_token"  # noqa: S105


OUTCOMES_BY_STAGE = {
    Stage.POLLER: (Outcome.PUBLISHED, Outcome.SKIPPED),
    Stage.ROUTER: (Outcome.ROUTED, Outcome.DUPLICATE, Outcome.QUARANTINED),
    Stage.SENDER: (
        Outcome.SENT,
        Outcome.RETRYING,
        Outcome.FAILED,
        Outcome.DUPLICATE,
        Outcome.QUARANTINED,
    ),
}


def precreate(stage: Stage) -> None:
    """Start every series of a stage at zero, so the first event shows in rate()."""
    for outcome in OUTCOMES_BY_STAGE[stage]:
        MESSAGES.labels(stage=stage, outcome=outcome)
    QUARANTINED.labels(stage=stage)


def forget_channel(channel_id: int) -> None:
    """Drop a channel's gauges once this process no longer polls it."""
    for gauge in (LAST_POLL_SUCCESS, CONSECUTIVE_FAILURES):
        try:
            gauge.remove(str(channel_id))
        except KeyError:
            continue
    for credential in Credential:
        try:
            CREDENTIAL_EXPIRY.remove(str(channel_id), credential)
        except KeyError:
            continue


class _HealthHandler(MetricsHandler):
    ready: Callable[[], bool] = staticmethod(lambda: True)

    def do_GET(self) -> None:
        if self.path == "/livez":
            self._plain(200, b"ok\n")
        elif self.path == "/readyz":
            ok = type(self).ready()
            self._plain(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
        else:
            super().do_GET()

    def _plain(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""


def serve_metrics(
    host: str, port: int, ready: Callable[[], bool]
) -> ThreadingHTTPServer:
    """Serve /metrics, /livez and /readyz from a daemon thread."""
    handler = type("HealthHandler", (_HealthHandler,), {"ready": staticmethod(ready)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
