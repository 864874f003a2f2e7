"""A RabbitMQ node of the tests' own, which they may stop and start at will.

The machine's shared node (5672) serves every other test, so a test that
restarts the broker mid-stream gets a second node: its own node name, AMQP and
distribution ports on 127.0.0.1, data and logs in a temporary directory, no
plugins, and the 16 MiB ``max_message_size`` that RabbitMQ 4 ships with, so a
publish over that limit fails here as it would in production.

Run as root, the node runs as the ``rabbitmq`` user with that user's home,
where the Erlang cookie it shares with ``rabbitmqctl`` lives
(``/var/lib/rabbitmq/.erlang.cookie``). Run as anyone else, it runs as that
user with the cookie in ``$HOME``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from contextlib import closing
from pathlib import Path

import amqp

HOST = "127.0.0.1"
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
START_SECONDS = 90.0
STOP_SECONDS = 60.0
SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
INSTALL_HINT = "install the rabbitmq-server package"


class RabbitNode:
    """One RabbitMQ node on free ports; ``stop`` and ``start`` keep its data."""

    def __init__(self, *, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mailroom-rabbit-"))
        self.name = f"mailroom-{uuid.uuid4().hex[:8]}@localhost"
        self.port, self.dist_port = _free_ports(2)
        self.max_message_size = max_message_size
        self._process: subprocess.Popen[bytes] | None = None
        self._as_rabbitmq = os.geteuid() == 0

    def __enter__(self) -> RabbitNode:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{HOST}:{self.port}//"

    def start(self) -> None:
        """Start the node; returns once it takes AMQP connections."""
        if not Path(SERVER).exists():
            raise RuntimeError(f"{SERVER} is missing; {INSTALL_HINT}")

        self._prepare_files()
        log = (self.root / "console.log").open("ab")
        self._process = subprocess.Popen(
            self._as_owner([SERVER]),
            cwd=self.root,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self._wait_until_serving()

    def stop(self) -> None:
        """Stop the node as an operator would, with ``rabbitmqctl stop``."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return

        self.ctl("stop", check=False)
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(STOP_SECONDS)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the node and delete its files; safe to call twice."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def ctl(self, *args: str, check: bool = True) -> str:
        """Run ``rabbitmqctl -n <node>`` with these arguments; its output."""
        done = subprocess.run(
            self._as_owner([CTL, "-n", self.name, *args]),
            env=self._env(),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=STOP_SECONDS,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout}{done.stderr}"
            )
        return done.stdout

    def queues(self) -> dict[str, tuple[int, int]]:
        """Every queue with its (ready, unacknowledged) message counts."""
        out = self.ctl(
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        )
        found = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                found[parts[0]] = (int(parts[1]), int(parts[2]))
        return found

    def log(self) -> str:
        """What the node wrote to its logs, for failure messages and checks."""
        parts = []
        for path in [*sorted(self.root.glob("log/*.log")), self.root / "console.log"]:
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def _env(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_"))
        }
        env.update(
            HOME=self._home(),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS=HOST,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.root / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.root / "log"),
            RABBITMQ_CONFIG_FILE=str(self.root / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.root / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(self.root / "rabbitmq-env.conf"),
            RABBITMQ_PID_FILE=str(self.root / "node.pid"),
            ERL_EPMD_ADDRESS=HOST,
            ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def _home(self) -> str:
        if self._as_rabbitmq:
            return pwd.getpwnam("rabbitmq").pw_dir
        return os.environ.get("HOME", str(self.root))

    def _as_owner(self, command: list[str]) -> list[str]:
        if self._as_rabbitmq:
            return ["runuser", "-u", "rabbitmq", "--", *command]
        return command

    def _prepare_files(self) -> None:
        config = (
            f"max_message_size = {self.max_message_size}\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )
        (self.root / "rabbitmq.conf").write_text(config)
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq-env.conf").write_text("")
        self.root.chmod(0o755)
        if self._as_rabbitmq:
            owner = pwd.getpwnam("rabbitmq")
            for path in [self.root, *self.root.rglob("*")]:
                os.chown(path, owner.pw_uid, owner.pw_gid)

    def _wait_until_serving(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_SECONDS
        while True:
            if self._process.poll() is not None:
                self._fail(f"exited with status {self._process.returncode}")
            if time.monotonic() > deadline:
                self._fail(
                    f"did not serve AMQP on port {self.port} in {START_SECONDS} s"
                )
            try:
                connection = amqp.Connection(f"{HOST}:{self.port}", connect_timeout=2)
                connection.connect()
                connection.close()
                return
            except (OSError, amqp.exceptions.AMQPError):
                time.sleep(0.2)

    def _fail(self, what: str) -> None:
        log = self.log()[-5000:]
        self.close()
        raise RuntimeError(f"RabbitMQ node {self.name} {what}; its log:\n{log}")


def _free_ports(count: int) -> list[int]:
    """Ports the kernel has just handed out, so free a moment ago."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            with closing(sock):
                pass
