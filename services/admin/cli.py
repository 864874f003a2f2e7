"""``mailroom``: the operators' command line.

Manages campaigns, channels, filters and the quarantine, sends a test reply,
and starts each service. Every rule (for example: a channel is activated only
when it has a default campaign) is enforced by ``shared.catalog``, the same
code any other front end uses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from email import errors, headerregistry
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import click
from psycopg import sql

from services.admin.commands import serve, token
from services.admin.oauth import (
    authorization_url,
    channel_sign_in,
    open_state,
    seal_state,
    store_sign_in,
)
from services.admin.validation import record_validation, validate_channel
from shared import blobs, broker, db
from shared import quarantine as quarantine_store
from shared.broker import Outgoing, Publisher
from shared.catalog import Catalog, Channel
from shared.errors import MailroomError
from shared.logs import configure_logging
from shared.models import Address, OutboundAttachment, OutboundEmail
from shared.secrets import SecretBox, generate_key
from shared.settings import Settings, get_settings
from shared.topology import OUTBOUND_KEY, Topology

SERVICES = ("poller", "router", "sender")


def _settings() -> Settings:
    try:
        return get_settings()
    except ValueError as exc:
        raise click.ClickException(f"invalid MAILROOM_ settings: {exc}") from exc


@contextmanager
def _catalog() -> Iterator[Catalog]:
    settings = _settings()
    try:
        with db.connect(settings.database_url.get_secret_value()) as conn:
            yield Catalog(conn, SecretBox(settings.secret_keys))
    except MailroomError as exc:
        raise click.ClickException(str(exc)) from exc


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        click.echo("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    click.echo("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for row in rows:
        click.echo("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


def _emit(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], as_json: bool
) -> None:
    if as_json:
        click.echo(json.dumps(list(rows), default=str, indent=2))
    else:
        _table(rows, columns)


class _Group(click.Group):
    """Turns Mailroom's errors into one clear line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MailroomError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Group)
def main() -> None:
    """Mailroom: email channels for contact centres.

    Settings come from MAILROOM_* environment variables (see the README).
    """
    # Logs go to stderr, so stdout carries only results (tables or JSON).
    configure_logging("cli", "warning")


@main.command()
def migrate() -> None:
    """Create the database if needed and apply pending schema migrations."""
    settings = _settings()
    created = db.create_database_if_missing(settings.database_url.get_secret_value())
    applied = db.migrate(settings.database_url.get_secret_value())
    click.echo(
        f"{'created the database; ' if created else ''}{applied} migration(s) applied"
    )


main.add_command(token)
main.add_command(serve)


# Secrets


@main.group()
def secrets() -> None:
    """Encryption keys of stored passwords and tokens."""


@secrets.command("new-key")
def secrets_new_key() -> None:
    """Print a new key for MAILROOM_SECRET_KEYS."""
    click.echo(generate_key())


@secrets.command("rotate")
def secrets_rotate() -> None:
    """Re-encrypt every stored secret with the first key of MAILROOM_SECRET_KEYS."""
    with _catalog() as catalog:
        rows = catalog.conn.execute(
            "SELECT id, secrets FROM channels WHERE secrets IS NOT NULL"
        ).fetchall()
        for row in rows:
            catalog.conn.execute(
                "UPDATE channels SET secrets = %s WHERE id = %s",
                (catalog.box.rotate(row["secrets"]), row["id"]),
            )
    click.echo(f"re-encrypted the secrets of {len(rows)} channel(s)")


# Campaigns


@main.group()
def campaign() -> None:
    """Campaigns: the agent queues that routed mail lands in."""


@campaign.command("add")
@click.argument("key")
@click.option("--name", help="Display name; the key when omitted.")
def campaign_add(key: str, name: str | None) -> None:
    """Add campaign KEY (lower-case letters, digits, '-' and '_')."""
    settings = _settings()
    with _catalog() as catalog:
        created = catalog.add_campaign(key, name or key)
    connection = broker.connect(settings.amqp_url.get_secret_value(), attempts=3)
    try:
        topology = Topology(
            prefix=settings.broker_prefix, queue_type=settings.queue_type
        )
        broker.declare(connection, lambda ch: topology.declare_campaign(ch, key))
    finally:
        connection.release()
    click.echo(
        f"campaign {created.key} added (id {created.id}); its mail arrives on "
        f"queue {topology.campaign_queue(created.key)}"
    )


@campaign.command("list")
@click.option("--json", "as_json", is_flag=True)
def campaign_list(as_json: bool) -> None:
    with _catalog() as catalog:
        rows = [c.model_dump() for c in catalog.campaigns()]
    _emit(rows, ("id", "key", "name"), as_json)


# Channels


def _account_options(prefix: str, label: str) -> Callable[[Any], Any]:
    def decorate(command: Any) -> Any:
        for option in reversed(
            [
                click.option(f"--{prefix}-host", help=f"{label} server host."),
                click.option(f"--{prefix}-port", type=int, help=f"{label} port."),
                click.option(
                    f"--{prefix}-security",
                    type=click.Choice(["tls", "starttls", "none"]),
                    help=f"{label}: implicit TLS, STARTTLS or none.",
                ),
                click.option(f"--{prefix}-username", help=f"{label} login name."),
                click.option(
                    f"--{prefix}-password",
                    envvar=f"MAILROOM_{prefix.upper()}_PASSWORD",
                    help=f"{label} password (or MAILROOM_{prefix.upper()}_PASSWORD).",
                ),
                click.option(
                    f"--{prefix}-insecure",
                    is_flag=True,
                    help=f"{label}: do not verify the TLS certificate (logged).",
                ),
                click.option(
                    f"--{prefix}-ca-file", help=f"{label}: PEM file of a private CA."
                ),
            ]
        ):
            command = option(command)
        return command

    return decorate


def _account(kind: str | None, opts: dict[str, Any], prefix: str) -> dict[str, Any]:
    if kind is None:
        return {}
    account: dict[str, Any] = {"type": kind}
    for name in ("host", "port", "security", "username", "ca_file"):
        value = opts.get(f"{prefix}_{name}")
        if value is not None:
            account[name] = value
    if opts.get(f"{prefix}_insecure"):
        account["verify_tls"] = False
    if kind == "imap" and opts.get("in_folder"):
        account["folder"] = opts["in_folder"]
    return account


@main.group()
def channel() -> None:
    """Email channels: a mailbox polled for mail and an account replies leave by."""


@channel.command("add")
@click.argument("name")
@click.option("--address", required=True, help="The channel's email address.")
@click.option("--default-campaign", help="Key of the campaign unmatched mail goes to.")
@click.option(
    "--inbound", type=click.Choice(["imap", "pop3"]), help="Inbound protocol."
)
@_account_options("in", "Inbound")
@click.option("--in-folder", help="IMAP folder to poll (INBOX by default).")
@click.option("--outbound", type=click.Choice(["smtp"]), help="Outbound protocol.")
@_account_options("out", "Outbound")
@click.option("--sync-all-folders", is_flag=True, help="IMAP: poll every folder.")
@click.option(
    "--sync-recipient-only", is_flag=True, help="Only mail addressed to --address."
)
@click.option("--activate", is_flag=True, help="Activate it at once.")
def channel_add(name: str, **opts: Any) -> None:
    """Add channel NAME."""
    secrets_: dict[str, str] = {}
    if opts.get("in_password"):
        secrets_["inbound_password"] = opts["in_password"]
    if opts.get("out_password"):
        secrets_["outbound_password"] = opts["out_password"]
    with _catalog() as catalog:
        created = catalog.add_channel(
            name,
            address=opts["address"],
            default_campaign=opts.get("default_campaign"),
            inbound=_account(opts.get("inbound"), opts, "in"),
            outbound=_account(opts.get("outbound"), opts, "out"),
            secrets=secrets_,
            sync_all_folders=opts["sync_all_folders"],
            sync_recipient_only=opts["sync_recipient_only"],
        )
        if opts["activate"]:
            created = catalog.set_active(created.id, True)
    click.echo(
        f"channel {created.name} added (id {created.id}, "
        f"{'active' if created.active else 'inactive'})"
    )


def _channel_row(catalog: Catalog, item: Channel) -> dict[str, Any]:
    campaigns = {c.id: c.key for c in catalog.campaigns()}
    return {
        "id": item.id,
        "name": item.name,
        "address": item.address,
        "active": "yes" if item.active else "no",
        "default_campaign": campaigns.get(item.default_campaign_id or -1, "-"),
        "inbound": item.inbound.type if item.inbound else "-",
        "outbound": item.outbound.type if item.outbound else "-",
        "filters": item.filter_count,
        "last_poll_ok": item.last_poll_ok_at or "-",
        "last_error": item.last_poll_error or "",
    }


@channel.command("list")
@click.option("--json", "as_json", is_flag=True)
def channel_list(as_json: bool) -> None:
    with _catalog() as catalog:
        rows = [_channel_row(catalog, c) for c in catalog.channels()]
    _emit(
        rows,
        (
            "id",
            "name",
            "address",
            "active",
            "default_campaign",
            "inbound",
            "outbound",
            "filters",
            "last_poll_ok",
            "last_error",
        ),
        as_json,
    )


@channel.command("show")
@click.argument("name")
def channel_show(name: str) -> None:
    """Everything stored about a channel; of its secrets, only which are set."""
    with _catalog() as catalog:
        item = catalog.channel(_ref(name))
        stored = sorted(catalog.secrets(item.id))
    shown = item.model_dump(mode="json") | {"secrets_set": stored}
    click.echo(json.dumps(shown, indent=2))


@channel.command("activate")
@click.argument("name")
def channel_activate(name: str) -> None:
    with _catalog() as catalog:
        item = catalog.set_active(_ref(name), True)
    click.echo(f"channel {item.name} is active; pollers pick it up within seconds")


@channel.command("deactivate")
@click.argument("name")
def channel_deactivate(name: str) -> None:
    with _catalog() as catalog:
        item = catalog.set_active(_ref(name), False)
    click.echo(f"channel {item.name} is inactive; polling stops after the current poll")


@channel.command("set-default-campaign")
@click.argument("name")
@click.argument("campaign_key")
def channel_set_default(name: str, campaign_key: str) -> None:
    with _catalog() as catalog:
        item = catalog.set_default_campaign(_ref(name), campaign_key)
    click.echo(f"channel {item.name}: default campaign is now {campaign_key}")


@channel.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def channel_delete(name: str, yes: bool) -> None:
    """Delete a channel, its filters and checkpoints, permanently."""
    if not yes:
        click.confirm(f"Delete channel {name} permanently?", abort=True)
    with _catalog() as catalog:
        catalog.delete_channel(_ref(name))
    click.echo(f"channel {name} deleted")


@channel.command("validate")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
@click.option(
    "--allow-private",
    is_flag=True,
    help="Let it reach loopback and private addresses (test servers).",
)
def channel_validate(name: str, as_json: bool, allow_private: bool) -> None:
    """Try channel NAME's inbound and outbound settings now, within 60 s.

    Keeps the result on the channel; exits 1 unless both directions pass.
    """
    settings = _settings()
    with _catalog() as catalog:
        item = catalog.channel(_ref(name))
        report = validate_channel(
            item,
            catalog.secrets(item.id),
            settings,
            allow_private=True if allow_private else None,
        )
        record_validation(catalog.conn, item.id, report, box=catalog.box)

    if as_json:
        click.echo(report.model_dump_json(indent=2))
    else:
        for line in report.lines():
            click.echo(line)
    sys.exit(0 if report.ok else 1)


@channel.command("authorise")
@click.argument("name")
@click.option(
    "--returned-url",
    help="The address Microsoft sent the browser back to; asked for when omitted.",
)
def channel_authorise(name: str, returned_url: str | None) -> None:
    """Sign channel NAME in to Microsoft as a person (Save and authorise).

    Prints the sign-in address to open in a browser. Where the admin API
    serves the channel's redirect URI, the sign-in finishes there; otherwise
    paste the address the browser ends up on, with its code, when asked.
    """
    with _catalog() as catalog:
        item = catalog.channel(_ref(name))
        sign_in = channel_sign_in(item)
        state = seal_state(catalog, item.id, "cli")
        url = authorization_url(
            sign_in.app, catalog.secrets(item.id), state, sign_in.scopes.delegated
        )
        if returned_url is None:
            click.echo(f"Open this address in a browser and sign in:\n\n{url}\n")
            returned_url = click.prompt(
                "Address the browser was sent back to", prompt_suffix=": "
            )
        query = parse_qs(urlsplit(returned_url.strip()).query)
        answer = {key: values[0] for key, values in query.items()}
        if open_state(catalog, answer.get("state", "")) is None:
            raise click.ClickException(
                "that address does not belong to this sign-in, or it is older "
                "than 15 minutes; run the command again"
            )
        store_sign_in(
            catalog,
            item.id,
            answer.get("code", ""),
            answer.get("error", ""),
            answer.get("error_description", ""),
        )
    click.echo(f"channel {item.name} is authorised")


def _ref(value: str) -> int | str:
    return int(value) if value.isdigit() else value


# Filters


@main.group("filter")
def filter_() -> None:
    """Per-channel filters: keywords that choose a campaign, in order."""


@filter_.command("add")
@click.argument("channel_name")
@click.option(
    "--field", type=click.Choice(["sender", "subject", "body"]), required=True
)
@click.option("--contains", "contains", help="Match when the text contains this.")
@click.option("--not-contains", help="Match when the text does not contain this.")
@click.option("--regex", help="Match this regular expression (time-limited).")
@click.option("--campaign", "campaign_key", required=True, help="Target campaign key.")
@click.option(
    "--no-stop", is_flag=True, help="Let later matching filters override this one."
)
def filter_add(
    channel_name: str,
    field: str,
    contains: str | None,
    not_contains: str | None,
    regex: str | None,
    campaign_key: str,
    no_stop: bool,
) -> None:
    """Append a filter to CHANNEL_NAME's list (evaluated in order)."""
    given = [
        (op, v)
        for op, v in (
            ("contains", contains),
            ("not_contains", not_contains),
            ("regex", regex),
        )
        if v
    ]
    if len(given) != 1:
        raise click.UsageError(
            "give exactly one of --contains, --not-contains, --regex"
        )
    operator, value = given[0]
    with _catalog() as catalog:
        created = catalog.add_filter(
            _ref(channel_name), field, value, campaign_key, operator, stop=not no_stop
        )
    click.echo(f"filter {created.id} added at position {created.position}")


@filter_.command("list")
@click.argument("channel_name")
@click.option("--json", "as_json", is_flag=True)
def filter_list(channel_name: str, as_json: bool) -> None:
    with _catalog() as catalog:
        keys = {c.id: c.key for c in catalog.campaigns()}
        rows = [
            {**f.model_dump(mode="json"), "campaign": keys.get(f.campaign_id)}
            for f in catalog.filters(_ref(channel_name))
        ]
    _emit(
        rows,
        ("id", "position", "field", "operator", "value", "campaign", "stop"),
        as_json,
    )


@filter_.command("delete")
@click.argument("filter_id", type=int)
def filter_delete(filter_id: int) -> None:
    with _catalog() as catalog:
        catalog.delete_filter(filter_id)
    click.echo(f"filter {filter_id} deleted")


# Quarantine


@main.group("quarantine")
def quarantine_() -> None:
    """Messages kept because they could not be processed."""


@quarantine_.command("list")
@click.option("--all", "include_replayed", is_flag=True, help="Replayed ones too.")
@click.option("--limit", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def quarantine_list(include_replayed: bool, limit: int, as_json: bool) -> None:
    """Kept messages not replayed yet, newest first, with why each was kept."""
    with _catalog() as catalog:
        rows = [
            m.model_dump(mode="json")
            for m in quarantine_store.list_open(
                catalog.conn, include_replayed=include_replayed, limit=limit
            )
        ]
    _emit(rows, ("id", "stage", "channel_id", "created_at", "size", "reason"), as_json)


@quarantine_.command("show")
@click.argument("entry_id", type=int)
@click.option("--body", is_flag=True, help="Print the stored message body as well.")
def quarantine_show(entry_id: int, body: bool) -> None:
    """One kept message: where it came from, the reason and the detail."""
    with _catalog() as catalog:
        entry, data = quarantine_store.get(catalog.conn, entry_id)
    click.echo(json.dumps(entry.model_dump(mode="json"), indent=2))
    if body:
        click.echo(data.decode("utf-8", "replace"))


@quarantine_.command("replay")
@click.argument("entry_id", type=int)
def quarantine_replay(entry_id: int) -> None:
    """Publish a quarantined message again to the queue it came from."""
    settings = _settings()
    with _catalog() as catalog:
        entry = quarantine_store.replay(
            catalog.conn, settings.amqp_url.get_secret_value(), entry_id
        )
    click.echo(f"entry {entry_id} replayed to {entry.queue}")


def _publish(settings: Settings, batch: list[Outgoing]) -> None:
    """Publish with confirms, declaring the topology first: the CLI may run
    before any service has, and a publish to a missing exchange fails."""
    topology = Topology(prefix=settings.broker_prefix, queue_type=settings.queue_type)
    connection = broker.connect(settings.amqp_url.get_secret_value(), attempts=3)
    try:
        broker.declare(connection, topology.declare)
        Publisher(connection).publish_all(batch)
    finally:
        connection.release()


# Outbound


@main.command("send")
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
    settings = _settings()
    recipients = [_recipient(value) for value in to]
    with _catalog() as catalog:
        item = catalog.channel(_ref(channel_name))
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
    _publish(
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


@main.command("delivery")
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
    with _catalog() as catalog:
        conditions: list[sql.Composable] = [sql.SQL("TRUE")]
        params: list[Any] = []
        if keys:
            conditions.append(sql.SQL("idempotency_key = ANY(%s)"))
            params.append(list(keys))
        if channel_name:
            conditions.append(sql.SQL("channel_id = %s"))
            params.append(catalog.channel(_ref(channel_name)).id)
        query = sql.SQL(
            "SELECT idempotency_key AS key, channel_id, state, attempts, smtp_code, "
            "detail, updated_at FROM outbound_deliveries WHERE {} "
            "ORDER BY updated_at DESC LIMIT %s"
        ).format(sql.SQL(" AND ").join(conditions))
        rows = catalog.conn.execute(query, [*params, limit]).fetchall()
    found = {row["key"] for row in rows}
    missing = [key for key in keys if key not in found]
    _emit(
        [dict(row) for row in rows],
        ("key", "channel_id", "state", "attempts", "smtp_code", "detail"),
        as_json,
    )
    if missing:
        click.echo(
            f"not seen by a sender yet (queued, or never sent): {', '.join(missing)}",
            err=True,
        )


# Services


@main.command("run")
@click.argument("service", type=click.Choice([*SERVICES, "all"]))
def run(service: str) -> None:
    """Run one service in the foreground, or all three as child processes."""
    if service != "all":
        os.execv(sys.executable, [sys.executable, "-m", f"services.{service}"])  # noqa: S606

    # One port can serve one process: MAILROOM_METRICS_PORT=N gives the
    # poller N, the router N+1 and the sender N+2 (0 still turns them off).
    base = os.environ.get("MAILROOM_METRICS_PORT")
    children = []
    for offset, name in enumerate(SERVICES):
        env = dict(os.environ)
        if base and base != "0":
            env["MAILROOM_METRICS_PORT"] = str(int(base) + offset)
        children.append(
            subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=env)
        )

    def _forward(signum: int, _frame: Any) -> None:
        for child in children:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, _forward)
    signal.signal(signal.SIGINT, _forward)
    while all(child.poll() is None for child in children):
        time.sleep(0.5)
    _forward(signal.SIGTERM, None)
    codes = [child.wait() for child in children]
    raise SystemExit(max(codes))
