"""A PostgreSQL instance of the tests' own, which they may stop and start at will.

The machine's shared server (5432) serves every other test, so a test that
restarts the database mid-stream gets a second instance: a cluster made with
``initdb`` in a temporary directory, listening on a free port of 127.0.0.1
and on a Unix socket in that directory, trusting local connections.

initdb refuses to run as root, so run as root every command runs as the
``postgres`` user, which owns the directory. Run as anyone else, as that user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import closing
from pathlib import Path

import psycopg
from psycopg import sql

HOST = "127.0.0.1"
BIN = Path("/usr/lib/postgresql/15/bin")
START_SECONDS = 60
INSTALL_HINT = "install the postgresql-15 package"

# Durability settings stay as in production (a commit is on disk before it is
# acknowledged) except fsync: the tests crash the server, never the machine.
SERVER_OPTIONS = (
    "-c fsync=off",
    "-c full_page_writes=off",
    "-c shared_buffers=32MB",
    "-c max_connections=100",
    # A backend whose client was killed notices within a second, even while
    # it waits for a lock, instead of waiting on until the lock is free.
    "-c client_connection_check_interval=1000",
)


class PostgresNode:
    """One PostgreSQL cluster on a free port; ``stop`` and ``start`` keep its data."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mailroom-postgres-"))
        self.data = self.root / "data"
        self.sockets = self.root / "run"
        self.log_file = self.root / "server.log"
        self.port = _free_port()
        self._as_postgres = os.geteuid() == 0
        self._initialised = False

    def __enter__(self) -> PostgresNode:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/{database}"

    def start(self) -> None:
        """Start the server (making the cluster the first time) and wait for it."""
        if not (BIN / "pg_ctl").exists():
            raise RuntimeError(f"{BIN / 'pg_ctl'} is missing; {INSTALL_HINT}")

        if not self._initialised:
            self._initdb()
        options = " ".join(
            [
                f"-p {self.port}",
                f"-k {self.sockets}",
                f"-c listen_addresses={HOST}",
                *SERVER_OPTIONS,
            ]
        )
        self._pg_ctl(
            "start", "-w", "-t", str(START_SECONDS), "-l", str(self.log_file),
            "-o", options,
        )  # fmt: skip
        self._wait_until_serving()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` as an operator would, ``immediate`` as a crash."""
        if (self.data / "postmaster.pid").exists():
            self._pg_ctl("stop", "-w", "-m", mode, check=False)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def close(self) -> None:
        """Stop the server and delete its files; safe to call twice."""
        if self.data.exists():
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self, name: str) -> str:
        """Create a database and return its URL."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def log(self) -> str:
        if self.log_file.exists():
            return self.log_file.read_text(errors="replace")
        return ""

    def _initdb(self) -> None:
        self.sockets.mkdir()
        self.root.chmod(0o755)
        if self._as_postgres:
            owner = pwd.getpwnam("postgres")
            for path in (self.root, self.sockets):
                os.chown(path, owner.pw_uid, owner.pw_gid)

        self._run(
            [
                str(BIN / "initdb"),
                "-D", str(self.data),
                "-U", "postgres",
                "--auth=trust",
                "-E", "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )  # fmt: skip
        self._initialised = True

    def _pg_ctl(self, *args: str, check: bool = True) -> None:
        self._run([str(BIN / "pg_ctl"), "-D", str(self.data), *args], check=check)

    def _run(self, command: list[str], *, check: bool = True) -> None:
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(
            command,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=START_SECONDS * 2,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({done.returncode}):\n"
                f"{done.stdout}{done.stderr}\n{self.log()[-3000:]}"
            )

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                with psycopg.connect(self.url(), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def _free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])
