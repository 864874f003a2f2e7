"""``mailroom channel``: email channels, their accounts, Validate and the
Microsoft sign-in. The CLI adds the group to its own."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import click

from services.admin.cli_support import emit, load_settings, open_catalog, ref
from services.admin.oauth import (
    authorization_url,
    channel_sign_in,
    open_state,
    seal_state,
    store_sign_in,
)
from services.admin.validation import record_validation, validate_channel
from shared.catalog import Catalog, Channel

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


@click.group()
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
    with open_catalog() as catalog:
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
    """Every channel: switched on or not, accounts, filters and the last poll."""
    with open_catalog() as catalog:
        rows = [_channel_row(catalog, c) for c in catalog.channels()]
    emit(
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
    with open_catalog() as catalog:
        item = catalog.channel(ref(name))
        stored = sorted(catalog.secrets(item.id))
    shown = item.model_dump(mode="json") | {"secrets_set": stored}
    click.echo(json.dumps(shown, indent=2))


@channel.command("activate")
@click.argument("name")
def channel_activate(name: str) -> None:
    """Switch channel NAME on: poll it (it needs a default campaign)."""
    with open_catalog() as catalog:
        item = catalog.set_active(ref(name), True)
    click.echo(f"channel {item.name} is active; pollers pick it up within seconds")


@channel.command("deactivate")
@click.argument("name")
def channel_deactivate(name: str) -> None:
    """Switch channel NAME off: stop polling it."""
    with open_catalog() as catalog:
        item = catalog.set_active(ref(name), False)
    click.echo(f"channel {item.name} is inactive; polling stops after the current poll")


@channel.command("set-default-campaign")
@click.argument("name")
@click.argument("campaign_key")
def channel_set_default(name: str, campaign_key: str) -> None:
    """Send mail no filter of channel NAME matches to CAMPAIGN_KEY."""
    with open_catalog() as catalog:
        item = catalog.set_default_campaign(ref(name), campaign_key)
    click.echo(f"channel {item.name}: default campaign is now {campaign_key}")


@channel.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def channel_delete(name: str, yes: bool) -> None:
    """Delete a channel, its filters and checkpoints, permanently."""
    if not yes:
        click.confirm(f"Delete channel {name} permanently?", abort=True)
    with open_catalog() as catalog:
        catalog.delete_channel(ref(name))
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
    settings = load_settings()
    with open_catalog() as catalog:
        item = catalog.channel(ref(name))
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
    with open_catalog() as catalog:
        item = catalog.channel(ref(name))
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
