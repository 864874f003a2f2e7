"""Run Mailroom's services as separate processes, as an operator would."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MAILROOM_DATABASE_URL=settings.database_url.get_secret_value(),
        MAILROOM_AMQP_URL=settings.amqp_url.get_secret_value(),
        MAILROOM_BROKER_PREFIX=settings.broker_prefix,
        MAILROOM_METRICS_PORT="0",
        MAILROOM_POLL_INTERVAL_SECONDS="1",
        PYTHONPATH=str(ROOT),
    )
    if settings.secret_keys is not None:
        env["MAILROOM_SECRET_KEYS"] = settings.secret_keys.get_secret_value()
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Service:
    """One service process with its JSON log kept in a file."""

    def __init__(
        self, name: str, env: dict[str, str], log_dir: Path, *, metrics_port: int = 0
    ):
        self.name = name
        self.metrics_port = metrics_port
        self.log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            env={**env, "MAILROOM_METRICS_PORT": str(metrics_port)},
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str) -> tuple[int, str]:
        """GET a path of the service's metrics endpoint: (status, body)."""
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> int:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._log.close()

    def lines(self) -> Iterator[dict[str, Any]]:
        """The JSON log lines written so far (anything else is skipped)."""
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue

    def errors(self) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("level") == "error"]

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")
