"""GraphMailbox against the HTTPS fake of Azure AD and Graph: delta paging,
processed mail, folders, throttling and sign-in errors."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from services.poller.fetched import Fetched
from services.poller.graph import GraphMailbox
from services.poller.graph_state import DeltaLinkStore
from shared import broker
from shared.catalog import Catalog
from shared.errors import (
    ChannelAuthError,
    ChannelConnectError,
    ChannelError,
    ChannelProtocolError,
)
from shared.models import RawEmail
from shared.settings import Settings
from shared.topology import Topology
from tests.conftest import AMQP_URL
from tests.support.graph_fake import GraphFake, RegisteredApp
from tests.support.processes import Service, service_env
from tests.support.queues import drain

TENANT = "5f8c1a9e-2b7d-4c1e-9a3f-0d6e8b2c4a71"
CLIENT_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
SECRET = "Xy7~secret.value~0123456789abcdefABCDEF"
MAILBOX = "support@contoso.example"


def mime(number: int) -> bytes:
    return (
        f"From: customer{number}@example.org\r\n"
        f"To: {MAILBOX}\r\n"
        f"Subject: question {number}\r\n"
        f"Message-ID: <q{number}@example.org>\r\n"
        "\r\n"
        f"Body of question {number}.\r\n"
    ).encode()


@pytest.fixture
def app(graph_fake: GraphFake) -> RegisteredApp:
    graph_fake.add_mailbox(MAILBOX)
    return graph_fake.register_app(TENANT, CLIENT_ID, SECRET)


def mailbox(fake: GraphFake, app: RegisteredApp, **settings: str) -> GraphMailbox:
    return GraphMailbox(
        fake.account(app, MAILBOX, **settings),
        {"client_secret": SECRET},
        timeout=10,
    )


def poll(
    box: GraphMailbox, folder: str, link: str | None, max_bytes: int = 1_000_000
) -> tuple[list[list[Fetched]], list[str]]:
    pages, links = [], []
    for fetched, following in box.fetch_new(folder, link, max_bytes=max_bytes):
        pages.append(fetched)
        links.append(following)
    return pages, links


def test_a_first_poll_pages_through_every_message_in_the_folder(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    for number in range(120):
        graph_fake.add_message(MAILBOX, "inbox", mime(number))

    with mailbox(graph_fake, app) as box:
        inbox = box.folders(all_folders=False)[0]
        pages, links = poll(box, inbox, None)

    assert [50, 50, 20] == [len(page) for page in pages]
    assert ["$skiptoken", "$skiptoken", "$deltatoken"] == [
        "$deltatoken" if "$deltatoken" in link else "$skiptoken" for link in links
    ]
    assert {mime(n) for n in range(120)} == {f.data for page in pages for f in page}


def test_fetched_messages_name_their_folder_and_graph_id(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    remote_id = graph_fake.add_message(MAILBOX, "inbox", mime(1))

    with mailbox(graph_fake, app) as box:
        inbox = box.folders(all_folders=False)[0]
        pages, _links = poll(box, inbox, None)

    source = pages[0][0].source
    assert (inbox, remote_id) == (source.folder, source.remote_id)
    assert f"graph:{remote_id}" == source.key()
    assert len(mime(1)) == pages[0][0].size


def test_a_poll_from_the_stored_delta_link_returns_only_new_mail(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    for number in range(3):
        graph_fake.add_message(MAILBOX, "inbox", mime(number))
    with mailbox(graph_fake, app) as box:
        inbox = box.folders(all_folders=False)[0]
        first, links = poll(box, inbox, None)
        box.mark_processed(inbox, [f.source.remote_id or "" for f in first[0]])
    graph_fake.add_message(MAILBOX, "inbox", mime(10))
    graph_fake.add_message(MAILBOX, "inbox", mime(11))

    with mailbox(graph_fake, app) as box:
        second, second_links = poll(box, inbox, links[-1])
        third, _ = poll(box, inbox, second_links[-1])

    assert [mime(10), mime(11)] == [f.data for page in second for f in page]
    assert [] == [f for page in third for f in page]


def test_processed_messages_are_marked_read_and_stay_in_the_folder(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    graph_fake.add_message(MAILBOX, "inbox", mime(1))
    graph_fake.add_message(MAILBOX, "inbox", mime(2))

    with mailbox(graph_fake, app) as box:
        inbox = box.folders(all_folders=False)[0]
        pages, _links = poll(box, inbox, None)
        box.mark_processed(inbox, [pages[0][0].source.remote_id or ""])

    assert [True, False] == [m.is_read for m in graph_fake.messages(MAILBOX, "inbox")]


def test_processed_messages_move_to_the_processed_folder_and_do_not_come_back(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    graph_fake.add_folder(MAILBOX, "Done", parent="inbox")
    graph_fake.add_message(MAILBOX, "inbox", mime(1))
    graph_fake.add_message(MAILBOX, "inbox", mime(2))

    with mailbox(graph_fake, app, processed_folder="Inbox/Done") as box:
        folders = box.folders(all_folders=True)
        inbox = folders[0]
        pages, links = poll(box, inbox, None)
        box.mark_processed(inbox, [f.source.remote_id or "" for f in pages[0]])
        again, _ = poll(box, inbox, links[-1])

    assert [] == graph_fake.messages(MAILBOX, "inbox")
    assert [mime(1), mime(2)] == [m.mime for m in graph_fake.messages(MAILBOX, "Done")]
    assert [] == [f for page in again for f in page]
    assert graph_fake.folder_id(MAILBOX, "Done") not in folders


def test_a_processed_folder_that_does_not_exist_is_named_in_the_error(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    graph_fake.add_message(MAILBOX, "inbox", mime(1))

    with mailbox(graph_fake, app, processed_folder="Handled") as box:
        inbox = box.folders(all_folders=False)[0]
        pages, _ = poll(box, inbox, None)
        with pytest.raises(ChannelError) as caught:
            box.mark_processed(inbox, [pages[0][0].source.remote_id or ""])

    assert f"mailbox {MAILBOX} has no folder 'Handled'" in str(caught.value)
    assert "create it" in str(caught.value)


def test_inbox_only_polls_the_inbox(graph_fake: GraphFake, app: RegisteredApp) -> None:
    graph_fake.add_folder(MAILBOX, "Customers")

    with mailbox(graph_fake, app) as box:
        folders = box.folders(all_folders=False)

    assert [graph_fake.folder_id(MAILBOX, "inbox")] == folders


def test_all_folders_include_children_and_junk_but_not_sent_drafts_or_deleted(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    for number in range(12):
        graph_fake.add_folder(MAILBOX, f"Region {number:02}")
    graph_fake.add_folder(MAILBOX, "Complaints", parent="inbox")
    graph_fake.add_folder(MAILBOX, "Urgent", parent="Complaints")
    graph_fake.add_folder(MAILBOX, "Old replies", parent="sentitems")
    graph_fake.add_folder(MAILBOX, "Bin sub", parent="deleteditems")

    with mailbox(graph_fake, app) as box:
        folders = box.folders(all_folders=True)

    expected = {
        graph_fake.folder_id(MAILBOX, name)
        for name in ["inbox", "junkemail", "archive", "Complaints", "Urgent"]
        + [f"Region {number:02}" for number in range(12)]
    }
    assert expected == set(folders)
    assert graph_fake.folder_id(MAILBOX, "inbox") == folders[0]
    assert len(expected) == len(folders)


def test_a_message_deleted_before_its_download_is_passed_over(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    ids = [graph_fake.add_message(MAILBOX, "inbox", mime(n)) for n in range(51)]

    with mailbox(graph_fake, app) as box:
        inbox = box.folders(all_folders=False)[0]
        pages = []
        for fetched, _link in box.fetch_new(inbox, None, max_bytes=1_000_000):
            if not pages:
                graph_fake.delete_message(MAILBOX, ids[-1])
            pages.append(fetched)

    assert [50, 0] == [len(page) for page in pages]


def test_a_message_over_the_limit_is_reported_with_its_size_and_not_downloaded(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    large = mime(1) + b"x" * 5000
    graph_fake.add_message(MAILBOX, "inbox", large)

    with mailbox(graph_fake, app) as box:
        inbox = box.folders(all_folders=False)[0]
        pages, _ = poll(box, inbox, None, max_bytes=1000)

    assert [(None, len(large))] == [(f.data, f.size) for f in pages[0]]


def test_throttled_requests_wait_as_long_as_graph_asks_and_then_succeed(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    graph_fake.add_message(MAILBOX, "inbox", mime(1))

    with mailbox(graph_fake, app) as box:
        inbox = box.folders(all_folders=False)[0]
        graph_fake.throttle_next(1, retry_after_seconds=1)
        started = time.monotonic()
        pages, _ = poll(box, inbox, None)
        waited = time.monotonic() - started

    assert [mime(1)] == [f.data for f in pages[0]]
    assert waited >= 1.0
    assert 2 == graph_fake.count("GET", r"/messages/delta$")


def test_throttling_longer_than_the_bound_is_a_connect_error_for_the_next_poll(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    with mailbox(graph_fake, app) as box:
        graph_fake.throttle_next(1, retry_after_seconds=3600)
        with pytest.raises(ChannelConnectError) as caught:
            box.folders(all_folders=False)

    assert "ApplicationThrottled" in str(caught.value)


def test_a_forgotten_delta_link_lists_the_folder_again(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    graph_fake.add_message(MAILBOX, "inbox", mime(1))
    with mailbox(graph_fake, app) as box:
        inbox = box.folders(all_folders=False)[0]
        _, links = poll(box, inbox, None)
    graph_fake.forget_delta_state()

    with mailbox(graph_fake, app) as box:
        pages, _ = poll(box, inbox, links[-1])

    assert [mime(1)] == [f.data for page in pages for f in page]


def test_a_link_to_another_host_is_refused_without_sending_the_token(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    with mailbox(graph_fake, app) as box:
        inbox = box.folders(all_folders=False)[0]
        link = "https://graph.example.net/v1.0/users/x/messages/delta?$deltatoken=1"
        with pytest.raises(ChannelProtocolError) as caught:
            poll(box, inbox, link)

    assert "refusing to send the token" in str(caught.value)


def test_an_expired_access_token_is_renewed_once_and_the_request_succeeds(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    with mailbox(graph_fake, app) as box:
        graph_fake.expire_tokens()
        folders = box.folders(all_folders=False)

    assert [graph_fake.folder_id(MAILBOX, "inbox")] == folders
    assert 2 == graph_fake.count("POST", r"/oauth2/v2\.0/token$")


def test_a_token_graph_keeps_refusing_is_an_auth_error(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    graph_fake.token_lifetime = 0

    with pytest.raises(ChannelAuthError) as caught, mailbox(graph_fake, app) as box:
        box.folders(all_folders=False)

    assert "refused the access token" in str(caught.value)
    assert "Lifetime validation failed" in str(caught.value)


def test_a_wrong_client_secret_says_to_paste_the_secret_value(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    account = graph_fake.account(app, MAILBOX)
    wrong = "not-the-secret-value"

    with pytest.raises(ChannelAuthError) as caught:
        GraphMailbox(account, {"client_secret": wrong}, timeout=10).__enter__()

    assert "client secret is wrong (AADSTS7000215)" in str(caught.value)
    assert "not its Secret ID" in str(caught.value)
    assert wrong not in str(caught.value)


def test_a_secret_with_white_space_around_it_says_so(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    account = graph_fake.account(app, MAILBOX)

    with pytest.raises(ChannelAuthError) as caught:
        GraphMailbox(account, {"client_secret": f" {SECRET}\n"}, timeout=10).__enter__()

    assert "white space at its start or end" in str(caught.value)


def test_an_unknown_tenant_says_where_to_find_the_tenant_id(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    account = graph_fake.account(app, MAILBOX).model_copy(
        update={"tenant_id": "contoso-typo"}
    )

    with pytest.raises(ChannelAuthError) as caught:
        GraphMailbox(account, {"client_secret": SECRET}, timeout=10).__enter__()

    assert "no tenant 'contoso-typo' (AADSTS90002)" in str(caught.value)
    assert "Directory (tenant) ID" in str(caught.value)


def test_an_unknown_client_id_says_where_to_find_it(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    account = graph_fake.account(app, MAILBOX).model_copy(
        update={"client_id": "11111111-2222-3333-4444-555555555555"}
    )

    with pytest.raises(ChannelAuthError) as caught:
        GraphMailbox(account, {"client_secret": SECRET}, timeout=10).__enter__()

    assert "(AADSTS700016)" in str(caught.value)
    assert "Application (client) ID" in str(caught.value)


def test_an_app_without_mail_permission_is_an_auth_error_naming_the_permission(
    graph_fake: GraphFake,
) -> None:
    graph_fake.add_mailbox(MAILBOX)
    app = graph_fake.register_app(TENANT, CLIENT_ID, SECRET, permissions=("Mail.Send",))

    with pytest.raises(ChannelAuthError) as caught, mailbox(graph_fake, app) as box:
        box.folders(all_folders=False)

    assert "ErrorAccessDenied" in str(caught.value)
    assert "application permissions Mail.ReadWrite" in str(caught.value)


def test_an_unknown_mailbox_is_named_in_the_error(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    account = graph_fake.account(app, "nobody@contoso.example")

    with (
        pytest.raises(ChannelError) as caught,
        GraphMailbox(account, {"client_secret": SECRET}, timeout=10) as box,
    ):
        box.folders(all_folders=False)

    assert "no Exchange Online mailbox 'nobody@contoso.example'" in str(caught.value)


def test_an_authority_that_is_not_trusted_is_a_connect_error_about_the_ca(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    account = graph_fake.account(app, MAILBOX).model_copy(update={"ca_file": None})

    with pytest.raises(ChannelConnectError) as caught:
        GraphMailbox(account, {"client_secret": SECRET}, timeout=10).__enter__()

    assert "certificate is not trusted" in str(caught.value)


def test_the_secret_and_tokens_stay_out_of_the_repr(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    with mailbox(graph_fake, app) as box:
        token = box.client.access_token()
        shown = repr(box) + repr(box.client)

    assert SECRET not in shown
    assert token not in shown


def test_the_delta_link_store_keeps_the_latest_link_of_each_folder(
    catalog: Catalog,
) -> None:
    channel = catalog.add_channel("graph support")
    store = DeltaLinkStore(catalog.conn, channel.id)

    store.put("inbox-id", "https://graph/delta?$skiptoken=1")
    store.put("inbox-id", "https://graph/delta?$deltatoken=2")
    store.put("junk-id", "https://graph/delta?$deltatoken=3")

    assert "https://graph/delta?$deltatoken=2" == store.get("inbox-id")
    assert "https://graph/delta?$deltatoken=3" == store.get("junk-id")
    assert None is store.get("archive-id")


def test_the_poller_process_reads_an_exchange_mailbox_once_and_marks_it_read(
    graph_fake: GraphFake,
    app: RegisteredApp,
    catalog: Catalog,
    settings: Settings,
    tmp_path: Path,
) -> None:
    graph_fake.add_folder(MAILBOX, "Orders", parent="inbox")
    graph_fake.add_message(MAILBOX, "inbox", mime(1))
    graph_fake.add_message(MAILBOX, "Orders", mime(2))
    catalog.add_campaign("general", "General")
    channel = catalog.add_channel(
        "exchange",
        address=MAILBOX,
        default_campaign="general",
        inbound=graph_fake.account(app, MAILBOX).model_dump(mode="json"),
        secrets={"client_secret": SECRET},
        sync_all_folders=True,
    )
    catalog.set_active(channel.id, True)
    topology = Topology(prefix=settings.broker_prefix)
    connection = broker.connect(AMQP_URL, attempts=3)
    try:
        broker.declare(connection, topology.declare)
    finally:
        connection.release()
    queue = topology.raw_queue
    env = service_env(settings)

    poller = Service("poller", env, tmp_path)
    try:
        first = drain(AMQP_URL, [queue], until=lambda t: len(t) >= 2, timeout=30)
        graph_fake.add_message(MAILBOX, "inbox", mime(3))
        later = drain(AMQP_URL, [queue], until=lambda t: len(t) >= 1, timeout=30)
        # Another round of polls finds nothing new.
        time.sleep(2.5)
        after = drain(AMQP_URL, [queue], until=lambda t: False, timeout=0.5)
    finally:
        poller.stop()

    def subjects(taken: list[Any]) -> list[str]:
        raws = [RawEmail.model_validate_json(m.body) for m in taken]
        return sorted(
            line.decode().removeprefix("Subject: ")
            for raw in raws
            for line in (raw.raw.data or b"").splitlines()
            if line.startswith(b"Subject:")
        )

    assert ["question 1", "question 2"] == subjects(first)
    assert ["question 3"] == subjects(later)
    assert [] == after
    read = [
        m.is_read for f in ("inbox", "Orders") for m in graph_fake.messages(MAILBOX, f)
    ]
    assert [True, True, True] == read
