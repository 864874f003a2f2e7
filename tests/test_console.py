"""The admin console in a real headless Chromium, against the real API.

Each step leaves a screenshot under test-artifacts/console/ to look at.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from selenium.webdriver.common.keys import Keys

from services.admin.api import create_app
from services.admin.tokens import Role
from shared.catalog import Catalog
from shared.settings import Settings
from tests.support.browser import Page, chromium, live_server, make_token, spki_hash
from tests.support.graph_fake import GraphFake
from tests.support.tls import TestPki

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "console"
# Campaigns are added through the catalog here, so the API never needs
# RabbitMQ; a closed port of 127.0.0.1 makes sure nothing is declared.
UNREACHABLE_BROKER = "amqp://guest:guest@127.0.0.1:1//"


@pytest.fixture(scope="module")
def signed_in(
    database_url: str, secret_key: str, pki: TestPki
) -> Iterator[tuple[Page, str]]:
    """A browser signed in to a running console as an administrator.

    It trusts the test servers' certificate, for the fake of Azure AD.
    """
    settings = Settings(
        database_url=database_url, secret_keys=secret_key, amqp_url=UNREACHABLE_BROKER
    )
    trusted = [spki_hash(pki.cert_file)]
    with live_server(create_app(settings)) as base, chromium(trusted) as driver:
        page = Page(driver, ARTIFACTS)
        driver.get(f"{base}/")
        page.fill("#token", make_token(database_url, Role.ADMIN))
        page.screenshot("00-sign-in")
        page.click("#login button[type=submit]")
        page.wait_for("#channels")
        yield page, base


@pytest.fixture
def console(signed_in: tuple[Page, str], clean_db: str) -> Page:
    """The console's channel list, on a database emptied for this test."""
    page, base = signed_in
    page.driver.get(f"{base}/#/channels")
    page.driver.refresh()
    page.wait_for("#channels")
    return page


def banner(page: Page, containing: str) -> str:
    page.wait_until(
        f"a banner saying {containing!r}",
        lambda: containing in page.driver.find_element("id", "banner").text,
    )
    return str(page.driver.find_element("id", "banner").text)


def rows(page: Page) -> list[str]:
    return page.texts("#channels tbody td.name")


def test_a_channel_made_in_the_console_cannot_be_enabled_without_a_default_campaign(
    console: Page, catalog: Catalog
) -> None:
    catalog.add_campaign("general", "General")
    console.click("#new-channel")
    console.fill("#f-name", "support")
    console.fill("#f-address", "support@example.test")
    console.choose("#f-inbound-type", "IMAP")
    console.fill("#f-in-host", "imap.example.test")
    console.fill("#f-in-username", "support")
    console.fill("#f-in-password", "imap-secret")
    console.click("#f-active")
    console.screenshot("01-new-channel-form")

    console.click("#save")
    refusal = banner(console, "no default campaign")
    field_error = console.wait_for("[data-error-for=default_campaign_id]").text
    console.screenshot("02-enable-refused-without-campaign")
    nothing_saved = catalog.channels()
    console.click("#f-active")
    console.click("#save")
    banner(console, "saved")
    console.wait_for("#channels tbody tr")
    console.screenshot("03-channel-listed")

    assert "default_campaign_id: channel 'support' has no default campaign" in refusal
    assert "has no default campaign" in field_error
    assert [] == nothing_saved
    assert ["support\nsupport@example.test"] == rows(console)
    assert ["0"] == console.texts("#channels tbody td.filters")
    assert "Inactive" in console.texts("#channels tbody td.status")[0]
    assert {"inbound_password": "imap-secret"} == catalog.secrets(
        catalog.channel("support").id
    )
    assert 993 == catalog.channel("support").inbound.port  # type: ignore[union-attr]


def test_a_bad_port_is_shown_next_to_the_port(console: Page) -> None:
    console.click("#new-channel")
    console.fill("#f-name", "support")
    console.choose("#f-inbound-type", "POP3")
    console.fill("#f-in-host", "pop.example.test")
    console.fill("#f-in-port", "70000")
    console.fill("#f-in-username", "support")

    console.click("#save")
    message = console.wait_for("[data-error-for='inbound.port']").text
    console.screenshot("04-bad-port")

    assert "less than or equal to 65535" in message


def test_the_toggle_refuses_a_channel_without_campaign_and_enables_one_with(
    console: Page, catalog: Catalog
) -> None:
    general = catalog.add_campaign("general", "General")
    imap = {"type": "imap", "host": "imap.example.test", "port": 993, "username": "u"}
    catalog.add_channel("no-campaign", "a@example.test", inbound=imap)
    catalog.add_channel(
        "ready", "b@example.test", default_campaign=general.id, inbound=imap
    )
    console.driver.refresh()
    console.wait_for("#channels tbody tr")

    console.click("tr[data-name=no-campaign] input.toggle")
    refusal = banner(console, "no default campaign")
    console.screenshot("05-toggle-refused")
    still_off = console.wait_for("tr[data-name=no-campaign] input.toggle").is_selected()
    console.click("tr[data-name=ready] input.toggle")
    banner(console, "ready enabled")
    console.screenshot("06-toggle-enabled")

    assert "choose one" in refusal
    assert False is still_off
    assert ["ready"] == [c.name for c in catalog.channels(active_only=True)]
    assert console.wait_for("tr[data-name=ready] input.toggle").is_selected()


def wait_for_filter(page: Page, value: str) -> None:
    page.wait_until(
        f"filter {value} listed",
        lambda: value in page.texts("#filters tbody td.value"),
    )


def test_filters_are_added_reordered_and_tried_on_a_message(
    console: Page, catalog: Catalog
) -> None:
    for key in ("general", "refunds", "vip", "billing"):
        catalog.add_campaign(key, key.title())
    channel = catalog.add_channel(
        "support", "s@example.test", default_campaign="general"
    )
    console.driver.refresh()
    console.click(f"tr[data-id='{channel.id}'] a.filters-link")
    console.wait_for("#filter-form")

    for field, value, campaign in (
        ("Subject", "refund", "Refunds (refunds)"),
        ("Sender", "@vip.example", "Vip (vip)"),
        ("Body", "invoice", "Billing (billing)"),
    ):
        console.choose("#ff-field", field)
        console.fill("#ff-value", value)
        console.choose("#ff-campaign", campaign)
        console.click("#ff-save")
        wait_for_filter(console, value)
    console.screenshot("07-filters-added")
    console.click("#filters tbody tr:nth-child(3) button.up")
    console.wait_until(
        "invoice moved up",
        lambda: console.texts("#filters tbody td.value")[1] == "invoice",
    )
    console.click("#filters tbody tr:nth-child(2) button.up")
    console.wait_until(
        "invoice at the top",
        lambda: console.texts("#filters tbody td.value")[0] == "invoice",
    )
    console.screenshot("08-filters-reordered")

    console.fill(
        "#dr-text",
        "From: ann@vip.example\nSubject: refund please\n\nno invoice attached",
    )
    console.click("#dr-run")
    console.wait_for("#dr-result")
    console.driver.execute_script(
        "document.getElementById('dr-result').scrollIntoView()"
    )
    console.screenshot("09-dry-run")

    assert ["invoice", "refund", "@vip.example"] == [
        f.value for f in catalog.filters(channel.id)
    ]
    assert ["1", "2", "3"] == console.texts("#filters tbody td.position")
    assert "Billing (billing)" == console.texts("#dr-result dd.campaign")[0]
    assert "invoice" in console.texts("#dr-result dd.matched-text")[0]
    assert console.texts("#dr-result dd.filter")[0].startswith("#1: body")


def test_quick_and_advanced_search_narrow_the_list(
    console: Page, catalog: Catalog
) -> None:
    catalog.add_campaign("billing", "Billing")
    catalog.add_campaign("other", "Other")
    for name, campaign in (
        ("billing-eu", "billing"),
        ("billing-us", "billing"),
        ("support", "other"),
    ):
        catalog.add_channel(name, f"{name}@example.test", default_campaign=campaign)
    catalog.record_validation("billing-eu", {"ok": True})
    console.driver.refresh()
    console.wait_for("#channels tbody tr")

    console.fill("#quick-search", "BILL")
    console.wait_until("two rows", lambda: len(rows(console)) == 2)
    quick = [r.split("\n")[0] for r in rows(console)]
    console.screenshot("10-quick-search")
    console.wait_for("#quick-search").send_keys(Keys.CONTROL, "a", Keys.DELETE)
    console.click("#toggle-advanced")
    console.choose("#adv-campaign", "Billing (billing)")
    console.choose("#adv-status", "Active")
    console.click("#adv-search")
    console.wait_until("one row", lambda: len(rows(console)) == 1)
    advanced = [r.split("\n")[0] for r in rows(console)]
    console.screenshot("11-advanced-search")
    console.choose("#adv-status", "All")
    console.fill("#adv-address", "us@")
    console.click("#adv-search")
    console.wait_until(
        "billing-us only",
        lambda: rows(console)[:1] == ["billing-us\nbilling-us@example.test"],
    )
    by_address = [r.split("\n")[0] for r in rows(console)]

    assert ["billing-eu", "billing-us"] == quick
    assert ["billing-eu"] == advanced
    assert ["billing-us"] == by_address


def test_a_channel_is_deleted_only_after_confirmation(
    console: Page, catalog: Catalog
) -> None:
    catalog.add_channel("keep-me", "k@example.test")
    catalog.add_channel("delete-me", "d@example.test")
    console.driver.refresh()
    console.wait_for("tr[data-name=delete-me]")

    console.click("tr[data-name=delete-me] button.delete")
    question = console.wait_for("#confirm-text").text
    console.screenshot("12-delete-confirmation")
    console.click("#confirm-cancel")
    after_cancel = [c.name for c in catalog.channels()]
    console.click("tr[data-name=delete-me] button.delete")
    console.click("#confirm-ok")
    banner(console, "deleted")
    console.wait_until("one row left", lambda: len(rows(console)) == 1)
    console.screenshot("13-deleted")

    assert "Delete channel “delete-me” permanently?" in question
    assert ["keep-me", "delete-me"] == after_cancel
    assert ["keep-me"] == [c.name for c in catalog.channels()]


def test_a_read_only_token_sees_the_channels_but_no_control_to_change_them(
    database_url: str, secret_key: str, catalog: Catalog
) -> None:
    general = catalog.add_campaign("general", "General")
    catalog.add_channel("support", "s@example.test", default_campaign=general.id)
    settings = Settings(
        database_url=database_url, secret_keys=secret_key, amqp_url=UNREACHABLE_BROKER
    )
    with live_server(create_app(settings)) as base, chromium() as driver:
        page = Page(driver, ARTIFACTS)
        driver.get(f"{base}/")
        page.fill("#token", make_token(database_url, Role.READ_ONLY))
        page.click("#login button[type=submit]")
        page.wait_for("tr[data-name=support]")
        page.screenshot("14-read-only")

        visible = {
            css: bool(page.driver.find_elements("css selector", css))
            and page.driver.find_element("css selector", css).is_displayed()
            for css in ("#new-channel", "#bulk-delete", "button.delete")
        }
        toggle_enabled = page.wait_for("input.toggle").is_enabled()
        who = page.wait_for("#who").text

    assert {"#new-channel": False, "#bulk-delete": False, "button.delete": False} == (
        visible
    )
    assert False is toggle_enabled
    assert who.endswith("(read-only)")


def test_save_and_authorise_signs_in_at_microsoft_and_comes_back_authorised(
    signed_in: tuple[Page, str], console: Page, catalog: Catalog, graph_fake: GraphFake
) -> None:
    _, base = signed_in
    port = urlsplit(base).port
    redirect = f"http://localhost:{port}/api/oauth/callback"
    graph_fake.add_mailbox("queue@contoso.example")
    graph_fake.signed_in_user = "queue@contoso.example"
    app = graph_fake.register_app(
        "7a1b2c3d-0e9f-4a8b-9c7d-6e5f4a3b2c1d",
        "c0ffee00-1234-4abc-8def-0123456789ab",
        "console~secret~value",
        redirect_uris=(redirect,),
    )
    account = graph_fake.account(
        app,
        "queue@contoso.example",
        auth_flow="client_credentials",
        redirect_uri=redirect,
    )
    created = catalog.add_channel(
        "exchange",
        "queue@contoso.example",
        inbound=account.model_dump(mode="json"),
        secrets={"client_secret": "console~secret~value"},
    )
    console.driver.get(f"{base}/#/channels/{created.id}/edit")
    console.wait_for("#f-in-flow")
    hidden_for_app_only = not console.driver.find_element(
        "id", "authorise"
    ).is_displayed()

    console.choose("#f-in-flow", "Delegated (authorization code)")
    console.screenshot("09-save-and-authorise")
    console.click("#authorise")
    console.wait_until(
        "the callback page",
        lambda: "is authorised" in console.driver.find_element("tag name", "h1").text,
    )
    console.screenshot("10-authorised")

    assert hidden_for_app_only
    assert "refresh_token" in catalog.secrets(created.id)
    stored = catalog.channel(created.id).inbound
    assert "authorization_code" == stored.auth_flow  # type: ignore[union-attr]
    assert graph_fake.url == stored.authority_host  # type: ignore[union-attr]
