"""An SMTP server that accepts and discards every message, in its own process.

aiosmtpd's ``Sink`` handler runs in a separate interpreter, so the server
does not share a GIL with the client being measured, and its CPU time can be
read to tell whether it, rather than the client, set the pace.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HOST = "127.0.0.1"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
START_SECONDS = 15.0


class SmtpSink:
    def __init__(self, log_file: Path) -> None:
        self.log_file = log_file
        self.host = HOST
        self.port = _free_port()
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "aiosmtpd",
                    "-n",
                    "-c",
                    "aiosmtpd.handlers.Sink",
                    "-s",
                    str(MAX_MESSAGE_BYTES),
                    "-l",
                    f"{self.host}:{self.port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        deadline = time.monotonic() + START_SECONDS
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"the SMTP sink exited at start; see {self.log_file}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"the SMTP sink did not listen within {START_SECONDS:g} s"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return

        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def cpu_seconds(self) -> float:
        """User and system CPU time the server has used so far."""
        if self._process is None:
            return 0.0
        fields = Path(f"/proc/{self._process.pid}/stat").read_text().rsplit(")", 1)[1]
        utime, stime = fields.split()[11:13]
        return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])
