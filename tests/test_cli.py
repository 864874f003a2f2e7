"""The operators' CLI against the real database and broker."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from services.admin.cli import main
from shared.logs import configure_logging
from shared.settings import Settings, get_settings
from shared.topology import Topology
from tests.conftest import AMQP_URL
from tests.support.processes import Service, service_env
from tests.support.queues import count
from tests.support.smtp import SmtpServer


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv(
        "MAILROOM_DATABASE_URL", settings.database_url.get_secret_value()
    )
    monkeypatch.setenv("MAILROOM_AMQP_URL", AMQP_URL)
    monkeypatch.setenv("MAILROOM_BROKER_PREFIX", settings.broker_prefix)
    assert settings.secret_keys is not None
    monkeypatch.setenv("MAILROOM_SECRET_KEYS", settings.secret_keys.get_secret_value())
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()
    # The CLI logs warnings only; the tests after these expect info lines.
    configure_logging("tests", "info")


def run(cli: CliRunner, *args: str) -> Result:
    return cli.invoke(main, list(args), catch_exceptions=False)


def add_channel(cli: CliRunner, *extra: str) -> Result:
    return run(
        cli,
        "channel", "add", "support",
        "--address", "support@example.test",
        "--inbound", "imap", "--in-host", "imap.example.test", "--in-port", "993",
        "--in-username", "support", "--in-password", "hunter2-imap",
        *extra,
    )  # fmt: skip


def test_a_campaign_added_by_the_cli_gets_its_queue(
    cli: CliRunner, settings: Settings
) -> None:
    result = run(cli, "campaign", "add", "billing", "--name", "Billing")

    assert 0 == result.exit_code, result.output
    queue = Topology(prefix=settings.broker_prefix).campaign_queue("billing")
    assert 0 == count(AMQP_URL, queue)
    listed = json.loads(run(cli, "campaign", "list", "--json").output)
    assert [("billing", "Billing")] == [(c["key"], c["name"]) for c in listed]


def test_a_channel_without_a_default_campaign_cannot_be_activated(
    cli: CliRunner,
) -> None:
    add_channel(cli)

    result = cli.invoke(main, ["channel", "activate", "support"])

    assert 1 == result.exit_code
    assert "has no default campaign" in result.output
    assert "set-default-campaign" in result.output


def test_a_channel_with_a_default_campaign_is_activated_and_listed(
    cli: CliRunner,
) -> None:
    run(cli, "campaign", "add", "general")
    add_channel(cli, "--default-campaign", "general")

    result = run(cli, "channel", "activate", "support")
    listed = json.loads(run(cli, "channel", "list", "--json").output)

    assert 0 == result.exit_code, result.output
    assert [("support", "yes", "general", "imap")] == [
        (c["name"], c["active"], c["default_campaign"], c["inbound"]) for c in listed
    ]


def test_the_stored_password_is_encrypted_and_never_shown(
    cli: CliRunner, settings: Settings
) -> None:
    from shared import db

    add_channel(cli)

    shown = run(cli, "channel", "show", "support").output
    with db.connect(settings.database_url.get_secret_value()) as conn:
        stored = conn.execute("SELECT secrets::text AS s FROM channels").fetchone()

    assert "hunter2-imap" not in shown
    assert ["inbound_password"] == json.loads(shown)["secrets_set"]
    assert stored is not None and "hunter2-imap" not in stored["s"]


def test_filters_are_added_in_order_and_listed_with_their_campaign(
    cli: CliRunner,
) -> None:
    run(cli, "campaign", "add", "general")
    run(cli, "campaign", "add", "billing")
    add_channel(cli, "--default-campaign", "general")

    run(cli, "filter", "add", "support", "--field", "subject", "--contains",
        "invoice", "--campaign", "billing")  # fmt: skip
    run(cli, "filter", "add", "support", "--field", "sender", "--regex",
        r"@(acme|initech)\.example$", "--campaign", "general", "--no-stop")  # fmt: skip
    listed = json.loads(run(cli, "filter", "list", "support", "--json").output)

    assert [
        (1, "subject", "contains", "invoice", "billing", True),
        (2, "sender", "regex", r"@(acme|initech)\.example$", "general", False),
    ] == [
        (f["position"], f["field"], f["operator"], f["value"], f["campaign"], f["stop"])
        for f in listed
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--in-port", "70000"], "inbound.imap.port"),
        (["--in-host", "not a host"], "inbound.imap.host"),
        (["--default-campaign", "nope"], "no campaign 'nope'"),
    ],
)
def test_bad_channel_settings_are_refused_with_a_message_naming_the_field(
    cli: CliRunner, args: list[str], message: str
) -> None:
    result = cli.invoke(
        main,
        ["channel", "add", "support", "--address", "a@example.test",
         "--inbound", "imap", "--in-host", "imap.example.test", "--in-port", "993",
         "--in-username", "u", *args],
    )  # fmt: skip

    assert 0 != result.exit_code
    assert message in result.output


def test_send_refuses_a_channel_that_cannot_send_and_an_address_that_is_none(
    cli: CliRunner,
) -> None:
    add_channel(cli)

    no_outbound = run(cli, "send", "--channel", "support", "--to", "a@example.org")
    bad_address = run(cli, "send", "--channel", "support", "--to", "not an address")

    assert 1 == no_outbound.exit_code
    assert "has no outbound account" in no_outbound.output
    assert 2 == bad_address.exit_code
    assert "--to" in bad_address.output


def test_delivery_shows_how_a_reply_sent_by_the_sender_went(
    cli: CliRunner,
    settings: Settings,
    smtp_server_factory: Callable[..., SmtpServer],
    tmp_path: Path,
) -> None:
    smtp_server = smtp_server_factory("plain")
    add_channel(
        cli,
        "--outbound", "smtp", "--out-host", "127.0.0.1",
        "--out-port", str(smtp_server.port), "--out-security", "none",
        "--out-username", "support",
    )  # fmt: skip
    sender = Service("sender", service_env(settings), tmp_path)
    try:
        queued = run(
            cli, "send", "--channel", "support", "--to", "zoe@example.org",
            "--subject", "Your order", "--text", "On its way.", "--key", "order-7",
        )  # fmt: skip
        smtp_server.wait_for(1, timeout=30)
        shown = wait_for_state(cli, "order-7", "sent")
    finally:
        sender.stop()
    unknown = run(cli, "delivery", "never-sent")

    assert 0 == queued.exit_code, queued.output
    assert "mailroom delivery order-7" in queued.output
    assert ("sent", 250) == (shown["state"], shown["smtp_code"])
    assert "250" in shown["detail"], shown
    assert "never-sent" in unknown.output
    assert "not seen by a sender yet" in unknown.output


def wait_for_state(cli: CliRunner, key: str, state: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        rows = json.loads(run(cli, "delivery", key, "--json").stdout)
        if rows and rows[0]["state"] == state:
            return dict(rows[0])
        time.sleep(0.2)
    raise AssertionError(f"delivery {key} did not reach {state}")
