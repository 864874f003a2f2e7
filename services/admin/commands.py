"""``mailroom token`` and ``mailroom serve``: access to the admin API, and
the API itself. The CLI adds these commands to its group."""

from __future__ import annotations

import json

import click

from services.admin.tokens import Role, TokenStore
from shared import db
from shared.errors import MailroomError
from shared.logs import configure_logging
from shared.settings import get_settings


@click.group()
def token() -> None:
    """API tokens of the admin API and its console."""


@token.command("create")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice([r.value for r in Role]),
    default=Role.READ_ONLY.value,
    show_default=True,
    help="read-only may look and try filters; admin may also change.",
)
def token_create(name: str, role: str) -> None:
    """Make token NAME and print it once; only its hash is kept."""
    try:
        with db.connect(get_settings().database_url.get_secret_value()) as conn:
            info, secret = TokenStore(conn).create(name, role)
    except MailroomError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"token {info.name} ({info.role.value}) created; it is shown once:")
    click.echo(secret)


@token.command("list")
@click.option("--json", "as_json", is_flag=True)
def token_list(as_json: bool) -> None:
    """Every token's name, role and last use; never the tokens themselves."""
    with db.connect(get_settings().database_url.get_secret_value()) as conn:
        tokens = TokenStore(conn).tokens()
    if as_json:
        click.echo(json.dumps([t.model_dump(mode="json") for t in tokens], indent=2))
        return
    for item in tokens:
        state = f"revoked {item.revoked_at:%Y-%m-%d}" if item.revoked_at else "valid"
        used = f"{item.last_used_at:%Y-%m-%d %H:%M}" if item.last_used_at else "never"
        click.echo(f"{item.name}  {item.role.value}  {state}  last used {used}")


@token.command("revoke")
@click.argument("name")
def token_revoke(name: str) -> None:
    """Revoke token NAME and end the console sessions opened with it."""
    try:
        with db.connect(get_settings().database_url.get_secret_value()) as conn:
            TokenStore(conn).revoke(name)
    except MailroomError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"token {name} revoked")


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
def serve(host: str, port: int) -> None:
    """Serve the admin API and its console (put TLS in front of it)."""
    import uvicorn

    from services.admin.api import create_app

    settings = get_settings()
    configure_logging("admin", settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        access_log=False,
        log_config=None,
        proxy_headers=True,
    )
