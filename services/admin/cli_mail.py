"""``mailroom quarantine``, ``send`` and ``delivery``: the mail that could not
be handled, and replies sent as a campaign system would. The CLI adds these
commands to its group."""

from __future__ import annotations

import json
import uuid
from email import errors, headerregistry
from pathlib import Path
from typing import Any

import click
from psycopg import sql

from services.admin.cli_support import emit, load_settings, open_catalog, publish, ref
from shared import blobs
from shared import quarantine as quarantine_store
from shared.broker import Outgoing
from shared.models import Address, OutboundAttachment, OutboundEmail
from shared.topology import OUTBOUND_KEY, Topology

# Quarantine


@click.group("quarantine")
def quarantine_() -> None:
    """Messages kept because they could not be processed."""


@quarantine_.command("list")
@click.option("--all", "include_replayed", is_flag=True, help="Replayed ones too.")
@click.option("--limit", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def quarantine_list(include_replayed: bool, limit: int, as_json: bool) -> None:
    """Kept messages not replayed yet, newest first, with why each was kept."""
    with open_catalog() as catalog:
        rows = [
            m.model_dump(mode="json")
            for m in quarantine_store.list_open(
                catalog.conn, include_replayed=include_replayed, limit=limit
            )
        ]
    emit(rows, ("id", "stage", "channel_id", "created_at", "size", "reason"), as_json)


@quarantine_.command("show")
@click.argument("entry_id", type=int)
@click.option("--body", is_flag=True, help="Print the stored message body as well.")
def quarantine_show(entry_id: int, body: bool) -> None:
    """One kept message: where it came from, the reason and the detail."""
    with open_catalog() as catalog:
        entry, data = quarantine_store.get(catalog.conn, entry_id)
    click.echo(json.dumps(entry.model_dump(mode="json"), indent=2))
    if body:
        click.echo(data.decode("utf-8", "replace"))


@quarantine_.command("replay")
@click.argument("entry_id", type=int)
def quarantine_replay(entry_id: int) -> None:
    """Publish a quarantined message again to the queue it came from."""
    settings = load_settings()
    with open_catalog() as catalog:
        entry = quarantine_store.replay(
            catalog.conn, settings.amqp_url.get_secret_value(), entry_id
        )
    click.echo(f"entry {entry_id} replayed to {entry.queue}")


# Outbound


@click.command("send")
@click.option("--channel", "channel_name", required=True)
@click.option("--to", "to", multiple=True, required=True)
@click.option("--subject", default="")
@click.option("--text", default="")
@click.option("--attach", type=click.Path(exists=True, dir_okay=False), multiple=True)
@click.option("--key", help="Idempotency key; a new one when omitted.")
def send(
    channel_name: str,
    to: tuple[str, ...],
    subject: str,
    text: str,
    attach: tuple[str, ...],
    key: str | None,
) -> None:
    """Publish an OutboundEmail, as a campaign system would.

    Refuses at once what the sender would fail anyway: a channel without an
    outbound account, or an address that is not one.
    """
    settings = load_settings()
    recipients = [_recipient(value) for value in to]
    with open_catalog() as catalog:
        item = catalog.channel(ref(channel_name))
        if item.outbound is None:
            raise click.ClickException(
                f"channel {item.name} has no outbound account, so nothing can be "
                "sent from it; add an SMTP or Exchange Online account first"
            )
        attachments = [
            OutboundAttachment(
                filename=Path(p).name,
                content=blobs.put(
                    catalog.conn,
                    Path(p).read_bytes(),
                    inline_max=settings.inline_max_bytes,
                ),
            )
            for p in attach
        ]
    out = OutboundEmail(
        idempotency_key=key or str(uuid.uuid4()),
        channel_id=item.id,
        to=recipients,
        subject=subject,
        text_body=text,
        attachments=attachments,
    )
    topology = Topology(prefix=settings.broker_prefix, queue_type=settings.queue_type)
    publish(
        settings,
        [
            Outgoing(
                topology.outbound_exchange,
                OUTBOUND_KEY,
                out.to_json(),
                out.idempotency_key,
            )
        ],
    )
    click.echo(f"queued for sending, idempotency key {out.idempotency_key}")
    click.echo(f"see how it went: mailroom delivery {out.idempotency_key}")


def _recipient(value: str) -> Address:
    """An address to send to, or a usage error naming the one that is not."""
    try:
        parsed = headerregistry.Address(addr_spec=value.strip())
        valid = bool(parsed.username and parsed.domain)
    except (ValueError, IndexError, errors.HeaderParseError):
        valid = False
    if not valid:
        raise click.BadParameter(
            f"{value!r} is not an email address (name@domain)", param_hint="--to"
        )
    return Address(email=value.strip())


@click.command("delivery")
@click.argument("keys", nargs=-1)
@click.option("--channel", "channel_name", help="The latest deliveries of a channel.")
@click.option("--limit", default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def delivery(
    keys: tuple[str, ...], channel_name: str | None, limit: int, as_json: bool
) -> None:
    """Where the OutboundEmails with these idempotency KEYS stand.

    The same outcome campaign systems get as DeliveryStatus events: sending,
    sent, retrying or failed, with the server's reply. Without KEYS, the
    latest deliveries (of --channel, or of every channel).
    """
    with open_catalog() as catalog:
        conditions: list[sql.Composable] = [sql.SQL("TRUE")]
        params: list[Any] = []
        if keys:
            conditions.append(sql.SQL("idempotency_key = ANY(%s)"))
            params.append(list(keys))
        if channel_name:
            conditions.append(sql.SQL("channel_id = %s"))
            params.append(catalog.channel(ref(channel_name)).id)
        query = sql.SQL(
            "SELECT idempotency_key AS key, channel_id, state, attempts, smtp_code, "
            "detail, updated_at FROM outbound_deliveries WHERE {} "
            "ORDER BY updated_at DESC LIMIT %s"
        ).format(sql.SQL(" AND ").join(conditions))
        rows = catalog.conn.execute(query, [*params, limit]).fetchall()
    found = {row["key"] for row in rows}
    missing = [key for key in keys if key not in found]
    emit(
        [dict(row) for row in rows],
        ("key", "channel_id", "state", "attempts", "smtp_code", "detail"),
        as_json,
    )
    if missing:
        click.echo(
            f"not seen by a sender yet (queued, or never sent): {', '.join(missing)}",
            err=True,
        )
