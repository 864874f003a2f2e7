"""The operators' CLI against the real database and broker."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner, Result

from services.admin.cli import main
from shared.settings import Settings, get_settings
from shared.topology import Topology
from tests.conftest import AMQP_URL
from tests.support.queues import count


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("MAILROOM_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("MAILROOM_AMQP_URL", AMQP_URL)
    monkeypatch.setenv("MAILROOM_BROKER_PREFIX", settings.broker_prefix)
    assert settings.secret_keys is not None
    monkeypatch.setenv("MAILROOM_SECRET_KEYS", settings.secret_keys.get_secret_value())
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


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
    with db.connect(settings.database_url) as conn:
        stored = conn.execute("SELECT secrets::text AS s FROM channels").fetchone()

    assert "hunter2-imap" not in shown
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
