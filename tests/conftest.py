"""Shared fixtures: a fresh PostgreSQL database and broker namespace per run.

The tests talk to the real PostgreSQL and RabbitMQ named by
``MAILROOM_TEST_DATABASE_URL`` and ``MAILROOM_TEST_AMQP_URL`` (localhost by
default). A server that is down fails the run; nothing is skipped for it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography.fernet import Fernet
from psycopg import sql

from shared import broker, db
from shared.catalog import Catalog
from shared.secrets import SecretBox
from shared.settings import Settings
from shared.topology import Topology
from tests.support.dovecot import dovecot  # noqa: F401
from tests.support.graph_fake import graph_fake  # noqa: F401
from tests.support.smtp import smtp_server_factory  # noqa: F401
from tests.support.tls import TestPki, make_pki

PG_SERVER = os.environ.get(
    "MAILROOM_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
AMQP_URL = os.environ.get(
    "MAILROOM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"
)
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A database of its own for this test run, dropped at the end."""
    name = f"mailroom_test_{uuid.uuid4().hex[:10]}"
    base = PG_SERVER.rsplit("/", 1)[0]
    with psycopg.connect(PG_SERVER, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = f"{base}/{name}"
    db.migrate(url)
    yield url
    with psycopg.connect(PG_SERVER, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def clean_db(database_url: str) -> str:
    """The run's database with every table emptied."""
    with db.connect(database_url) as conn:
        conn.execute(
            "TRUNCATE campaigns, channels, filters, mailbox_checkpoints, blobs, "
            "quarantine, routed_messages, outbound_deliveries, delivery_attempts, "
            "skipped_messages, pollers "
            "RESTART IDENTITY CASCADE"
        )
    return database_url


@pytest.fixture(scope="session")
def secret_key() -> str:
    return Fernet.generate_key().decode()


@pytest.fixture
def catalog(clean_db: str, secret_key: str) -> Iterator[Catalog]:
    with db.connect(clean_db) as conn:
        yield Catalog(conn, SecretBox(secret_key))


@pytest.fixture
def broker_prefix() -> Iterator[str]:
    """A namespace of exchanges and queues for one test, deleted afterwards."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    yield prefix
    conn = broker.connect(AMQP_URL, attempts=3)
    try:
        channel = conn.channel()
        for name in _names_with_prefix(prefix):
            channel.queue_delete(name)
        for suffix in ("raw", "routed", "outbound", "delivery-status", "dead"):
            channel.exchange_delete(f"{prefix}.{suffix}")
    finally:
        conn.release()


def _names_with_prefix(prefix: str) -> list[str]:
    """Queues this test declared: the fixed ones and any campaign queues."""
    import subprocess

    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [line.strip() for line in out.splitlines() if line.startswith(prefix + ".")]


@pytest.fixture
def settings(clean_db: str, broker_prefix: str, secret_key: str) -> Settings:
    return Settings(
        database_url=clean_db,
        amqp_url=AMQP_URL,
        broker_prefix=broker_prefix,
        secret_keys=secret_key,
        metrics_port=0,
    )


@pytest.fixture
def topology(settings: Settings) -> Topology:
    return Topology(prefix=settings.broker_prefix)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    """A test CA and a certificate for 127.0.0.1 and localhost."""
    return make_pki(tmp_path_factory.mktemp("pki"))
