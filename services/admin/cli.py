"""``mailroom``: the operators' command line.

Manages campaigns, channels (``cli_channels``), filters and the quarantine
(``cli_mail``, with sending a reply and reading how it went), and starts each
service. Every rule (for example: a channel is activated only
when it has a default campaign) is enforced by ``shared.catalog``, the same
code any other front end uses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import click

from services.admin.cli_channels import channel
from services.admin.cli_mail import delivery, quarantine_, send
from services.admin.cli_support import emit, load_settings, open_catalog, ref
from services.admin.commands import serve, token
from shared import broker, db
from shared.errors import MailroomError
from shared.logs import configure_logging
from shared.secrets import generate_key
from shared.topology import Topology

SERVICES = ("poller", "router", "sender")


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
    settings = load_settings()
    created = db.create_database_if_missing(settings.database_url.get_secret_value())
    applied = db.migrate(settings.database_url.get_secret_value())
    click.echo(
        f"{'created the database; ' if created else ''}{applied} migration(s) applied"
    )


main.add_command(token)
main.add_command(serve)
main.add_command(channel)
main.add_command(quarantine_)
main.add_command(send)
main.add_command(delivery)


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
    with open_catalog() as catalog:
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
    settings = load_settings()
    with open_catalog() as catalog:
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
    with open_catalog() as catalog:
        rows = [c.model_dump() for c in catalog.campaigns()]
    emit(rows, ("id", "key", "name"), as_json)


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
    with open_catalog() as catalog:
        created = catalog.add_filter(
            ref(channel_name), field, value, campaign_key, operator, stop=not no_stop
        )
    click.echo(f"filter {created.id} added at position {created.position}")


@filter_.command("list")
@click.argument("channel_name")
@click.option("--json", "as_json", is_flag=True)
def filter_list(channel_name: str, as_json: bool) -> None:
    with open_catalog() as catalog:
        keys = {c.id: c.key for c in catalog.campaigns()}
        rows = [
            {**f.model_dump(mode="json"), "campaign": keys.get(f.campaign_id)}
            for f in catalog.filters(ref(channel_name))
        ]
    emit(
        rows,
        ("id", "position", "field", "operator", "value", "campaign", "stop"),
        as_json,
    )


@filter_.command("delete")
@click.argument("filter_id", type=int)
def filter_delete(filter_id: int) -> None:
    with open_catalog() as catalog:
        catalog.delete_filter(filter_id)
    click.echo(f"filter {filter_id} deleted")


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
