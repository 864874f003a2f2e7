"""Everything one benchmark run needs, made at its start and removed at its end.

A database ``mailroom_bench_<id>`` of its own, a broker prefix ``bench<id>``
(every queue and exchange under it is deleted afterwards), a work directory
for logs and temporary files, and, when a benchmark asks for them, a Dovecot
and an SMTP sink on free ports of 127.0.0.1. PostgreSQL and RabbitMQ are the
shared local servers, named by ``MAILROOM_BENCH_DATABASE_URL`` (a server URL;
the database part is replaced) and ``MAILROOM_BENCH_AMQP_URL``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TextIO

import structlog
from cryptography.fernet import Fernet
from kombu import Connection
from psycopg import sql

from benchmarks.mail import MailMix
from benchmarks.sink import SmtpSink
from shared import broker, db
from shared.catalog import Catalog
from shared.db import DbConnection
from shared.logs import configure_logging
from shared.secrets import SecretBox
from shared.settings import Settings
from shared.topology import Topology
from tests.support.dovecot import Dovecot
from tests.support.tls import make_pki

SERVER_URL = os.environ.get(
    "MAILROOM_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
AMQP_URL = os.environ.get(
    "MAILROOM_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"
)
EXCHANGE_SUFFIXES = ("raw", "routed", "outbound", "delivery-status", "dead")


class BenchEnv:
    def __init__(self, *, quick: bool, profile_dir: Path | None, keep: bool):
        self.quick = quick
        self.profile_dir = profile_dir
        self.keep = keep
        self.run_id = uuid.uuid4().hex[:8]
        self.work = Path(tempfile.mkdtemp(prefix=f"mailroom-bench-{self.run_id}-"))
        self.logs = self.work / "logs"
        self.logs.mkdir()
        self.database_name = f"mailroom_bench_{self.run_id}"
        self.database_url = f"{SERVER_URL.rsplit('/', 1)[0]}/{self.database_name}"
        self.secret_key = Fernet.generate_key().decode()
        self.settings = Settings(
            database_url=self.database_url,
            amqp_url=AMQP_URL,
            broker_prefix=f"bench{self.run_id}",
            secret_keys=self.secret_key,
            metrics_port=0,
        )
        self.topology = Topology(prefix=self.settings.broker_prefix)
        self._bench_queues: set[str] = set()
        self._campaign_keys: set[str] = set()
        self._dovecot: Dovecot | None = None
        self._sink: SmtpSink | None = None
        self._mail: MailMix | None = None
        self._log_stream: TextIO | None = None

    @classmethod
    @contextmanager
    def create(
        cls, *, quick: bool, profile_dir: Path | None = None, keep: bool = False
    ) -> Iterator[BenchEnv]:
        env = cls(quick=quick, profile_dir=profile_dir, keep=keep)
        try:
            env._start()
            yield env
        finally:
            env._clean_up()

    @property
    def prefix(self) -> str:
        return self.settings.broker_prefix

    @property
    def log_file(self) -> Path:
        return self.logs / "workers.log"

    def _start(self) -> None:
        # The workers log one JSON line per message, as in production; the
        # lines go to a file so that the table stays readable.
        configure_logging("bench")
        self._log_stream = self.log_file.open("a")
        logging.basicConfig(
            format="%(message)s",
            stream=self._log_stream,
            level=logging.INFO,
            force=True,
        )
        structlog.configure(
            logger_factory=structlog.PrintLoggerFactory(file=self._log_stream)
        )

        with db.connect(SERVER_URL) as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database_name))
            )
        db.migrate(self.database_url)

        connection = self.broker()
        try:
            broker.declare(connection, self.topology.declare)
        finally:
            connection.release()

    # Servers and data, made on first use

    @property
    def dovecot(self) -> Dovecot:
        if self._dovecot is None:
            server = Dovecot(make_pki(self.work / "pki"))
            server.start()
            self._dovecot = server
        return self._dovecot

    @property
    def sink(self) -> SmtpSink:
        if self._sink is None:
            sink = SmtpSink(self.logs / "smtp-sink.log")
            sink.start()
            self._sink = sink
        return self._sink

    @property
    def mail(self) -> MailMix:
        if self._mail is None:
            self._mail = MailMix(generated=200 if self.quick else 858)
        return self._mail

    # PostgreSQL

    @contextmanager
    def connect_db(self) -> Iterator[DbConnection]:
        with db.connect(self.database_url) as conn:
            yield conn

    def catalog(self, conn: DbConnection) -> Catalog:
        return Catalog(conn, SecretBox(self.secret_key))

    def add_campaigns(self, conn: DbConnection, *keys: str) -> None:
        catalog = self.catalog(conn)
        existing = {c.key for c in catalog.campaigns()}
        for key in keys:
            if key not in existing:
                catalog.add_campaign(key, key.title())
            self._campaign_keys.add(key)

    # RabbitMQ

    def broker(self) -> Connection:
        return broker.connect(AMQP_URL, attempts=3)

    def bench_queue(self, connection: Connection, name: str) -> str:
        """A durable queue of the benchmark's own, reached by the default exchange."""
        queue = f"{self.prefix}.bench.{name}"
        channel = connection.channel()
        try:
            channel.queue_declare(queue, durable=True, auto_delete=False)
        finally:
            channel.close()
        self._bench_queues.add(queue)
        return queue

    def campaign_queues(self) -> list[str]:
        return [
            self.topology.campaign_queue(key) for key in sorted(self._campaign_keys)
        ]

    def purge(self, connection: Connection, *queues: str) -> None:
        channel = connection.channel()
        try:
            for queue in queues:
                with suppress(*broker.CONNECTION_ERRORS):
                    channel.queue_purge(queue)
        finally:
            with suppress(*broker.CONNECTION_ERRORS):
                channel.close()

    # The end of the run

    def _clean_up(self) -> None:
        if self._sink is not None:
            self._sink.stop()
        if self._dovecot is not None:
            self._dovecot.stop()
        with suppress(Exception):
            self._delete_broker_names()
        with suppress(Exception), db.connect(SERVER_URL) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(self.database_name)
                )
            )
        if self._log_stream is not None:
            self._log_stream.close()
        if not self.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    def _delete_broker_names(self) -> None:
        topology = self.topology
        queues = {
            *topology.work_queues(),
            *self.campaign_queues(),
            *(topology.retry_queue(n) for n in range(1, 6)),
            *self._bench_queues,
            *_listed_queues(self.prefix),
        }
        for queue in list(queues):
            if queue in topology.work_queues() or queue in self.campaign_queues():
                queues.add(f"{queue}.dead")

        connection = self.broker()
        try:
            for queue in sorted(queues):
                channel = connection.channel()
                with suppress(*broker.CONNECTION_ERRORS):
                    channel.queue_delete(queue)
                    channel.close()
            channel = connection.channel()
            for suffix in EXCHANGE_SUFFIXES:
                channel.exchange_delete(f"{self.prefix}.{suffix}")
        finally:
            connection.release()


def _listed_queues(prefix: str) -> list[str]:
    """Queues under the prefix that the broker knows, when rabbitmqctl is here."""
    if shutil.which("rabbitmqctl") is None:
        return []
    try:
        out = subprocess.run(
            ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if line.startswith(prefix + ".")]
