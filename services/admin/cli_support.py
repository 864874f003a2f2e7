"""What the CLI's commands share: settings, the catalog, tables and publishing."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click

from shared import broker, db
from shared.broker import Outgoing, Publisher
from shared.catalog import Catalog
from shared.errors import MailroomError
from shared.secrets import SecretBox
from shared.settings import Settings, get_settings
from shared.topology import Topology


def load_settings() -> Settings:
    try:
        return get_settings()
    except ValueError as exc:
        raise click.ClickException(f"invalid MAILROOM_ settings: {exc}") from exc


@contextmanager
def open_catalog() -> Iterator[Catalog]:
    settings = load_settings()
    try:
        with db.connect(settings.database_url.get_secret_value()) as conn:
            yield Catalog(conn, SecretBox(settings.secret_keys))
    except MailroomError as exc:
        raise click.ClickException(str(exc)) from exc


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        click.echo("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    click.echo("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for row in rows:
        click.echo("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def emit(rows: Sequence[dict[str, Any]], columns: Sequence[str], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(list(rows), default=str, indent=2))
    else:
        table(rows, columns)


def ref(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def publish(settings: Settings, batch: list[Outgoing]) -> None:
    """Publish with confirms, declaring the topology first: the CLI may run
    before any service has, and a publish to a missing exchange fails."""
    topology = Topology(prefix=settings.broker_prefix, queue_type=settings.queue_type)
    connection = broker.connect(settings.amqp_url.get_secret_value(), attempts=3)
    try:
        broker.declare(connection, topology.declare)
        Publisher(connection).publish_all(batch)
    finally:
        connection.release()
