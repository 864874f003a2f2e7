"""Log lines as the services write them: one JSON object each, on stderr."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading

import pytest
import structlog

from shared.logs import configure_logging, get_logger


def test_a_line_logged_on_another_thread_still_names_the_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    written = io.StringIO()
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    monkeypatch.setattr(sys, "stderr", written)
    configure_logging("poller", "info")
    try:
        worker = threading.Thread(
            target=lambda: get_logger("tests.logs").info(
                "watching with IDLE", channel_id=3, password="hunter2"
            )
        )
        worker.start()
        worker.join()
    finally:
        # The other tests log where they did before.
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)

    [line] = written.getvalue().splitlines()
    logged = json.loads(line)
    assert ("poller", "watching with IDLE", 3) == (
        logged["service"],
        logged["event"],
        logged["channel_id"],
    )
    assert "[redacted]" == logged["password"]
