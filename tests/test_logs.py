"""Log lines as the services write them: one JSON object each, on stderr."""

from __future__ import annotations

import json
import threading

import pytest

from shared.logs import configure_logging, get_logger


def test_a_line_logged_on_another_thread_still_names_the_service(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("poller", "info")
    try:
        worker = threading.Thread(
            target=lambda: get_logger("tests.logs").info(
                "watching with IDLE", channel_id=3, password="hunter2"
            )
        )
        worker.start()
        worker.join()
        [line] = capsys.readouterr().err.splitlines()
    finally:
        configure_logging("tests", "info")

    logged = json.loads(line)
    assert ("poller", "watching with IDLE", 3) == (
        logged["service"],
        logged["event"],
        logged["channel_id"],
    )
    assert "[redacted]" == logged["password"]
