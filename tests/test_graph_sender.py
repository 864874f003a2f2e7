"""GraphSender against the HTTPS fake of Graph: sendMail, drafts with upload
sessions for large attachments, throttling and refused credentials."""

from __future__ import annotations

import email
import email.policy
import hashlib
import os
import uuid
from email.message import EmailMessage
from pathlib import Path

import pytest

from services.sender.graph import GraphSender
from shared.catalog import Catalog
from shared.errors import PermanentDeliveryError, TemporaryDeliveryError
from shared.models import Address, DeliveryState, OutboundEmail
from shared.settings import Settings
from tests.support.graph_fake import GraphFake, RegisteredApp
from tests.support.outbound import publish_replies, statuses
from tests.support.processes import Service, service_env

TENANT = "5f8c1a9e-2b7d-4c1e-9a3f-0d6e8b2c4a71"
CLIENT_ID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
SECRET = "Xy7~secret.value~0123456789abcdefABCDEF"
MAILBOX = "support@contoso.example"
CUSTOMER = "customer@example.org"


def reply(*attachments: tuple[str, bytes]) -> bytes:
    message = EmailMessage()
    message["From"] = f"Support <{MAILBOX}>"
    message["To"] = CUSTOMER
    message["Subject"] = "Re: my order"
    message["Message-ID"] = "<reply-1@contoso.example>"
    message["In-Reply-To"] = "<question-1@example.org>"
    message["References"] = "<question-1@example.org>"
    message.set_content("Your order is on its way.\n")
    for filename, data in attachments:
        message.add_attachment(
            data, maintype="application", subtype="pdf", filename=filename
        )
    return message.as_bytes(policy=email.policy.SMTP)


@pytest.fixture
def app(graph_fake: GraphFake) -> RegisteredApp:
    graph_fake.add_mailbox(MAILBOX)
    return graph_fake.register_app(TENANT, CLIENT_ID, SECRET)


def sender(fake: GraphFake, app: RegisteredApp, secret: str = SECRET) -> GraphSender:
    return GraphSender(
        fake.account(app, MAILBOX), {"client_secret": secret}, timeout=10
    )


def test_a_small_message_goes_in_one_send_mail_with_its_headers_intact(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    data = reply()

    with sender(graph_fake, app) as graph:
        delivery = graph.send(data, [CUSTOMER])

    assert [("sendMail", data)] == [(s.via, s.mime) for s in graph_fake.sent]
    assert "<reply-1@contoso.example>" == delivery.message_id
    assert 0 == graph_fake.count("POST", r"/createUploadSession$")


def test_envelope_recipients_missing_from_the_headers_are_sent_as_bcc(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    with sender(graph_fake, app) as graph:
        graph.send(reply(), [CUSTOMER, "supervisor@contoso.example"])

    assert [CUSTOMER, "supervisor@contoso.example"] == sorted(
        graph_fake.sent[0].recipients
    )


def test_an_attachment_over_3_mb_is_uploaded_in_ranges_and_arrives_intact(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    invoice = os.urandom(7 * 1024 * 1024 + 123)

    with sender(graph_fake, app) as graph:
        delivery = graph.send(reply(("invoice.pdf", invoice)), [CUSTOMER])

    sent = graph_fake.sent[0]
    attached = {a.name: hashlib.sha256(a.data).hexdigest() for a in sent.attachments}
    assert "draft" == sent.via
    assert {"invoice.pdf": hashlib.sha256(invoice).hexdigest()} == attached
    assert 3 == graph_fake.count("PUT", r"^/upload/")
    assert 1 == delivery.attachments
    assert [] == graph_fake.messages(MAILBOX, "drafts")


def test_a_draft_keeps_the_threading_headers_of_the_composed_message(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    with sender(graph_fake, app) as graph:
        graph.send(reply(("big.pdf", os.urandom(3_500_000))), [CUSTOMER])

    parsed = email.message_from_bytes(graph_fake.sent[0].mime)
    assert ("<question-1@example.org>", "<reply-1@contoso.example>") == (
        parsed["In-Reply-To"],
        parsed["Message-ID"],
    )
    assert "Your order is on its way." in parsed.get_payload()[0].get_payload()


def test_small_attachments_too_large_together_are_attached_to_a_draft(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    parts = [(f"page{n}.pdf", os.urandom(1_200_000)) for n in range(3)]

    with sender(graph_fake, app) as graph:
        graph.send(reply(*parts), [CUSTOMER])

    sent = graph_fake.sent[0]
    assert "draft" == sent.via
    assert parts == [(a.name, a.data) for a in sent.attachments]
    assert 0 == graph_fake.count("POST", r"/createUploadSession$")


def test_throttling_longer_than_a_send_may_wait_is_a_temporary_failure(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    graph_fake.throttle_next(1, retry_after_seconds=120)

    with (
        pytest.raises(TemporaryDeliveryError) as caught,
        sender(graph_fake, app) as graph,
    ):
        graph.send(reply(), [CUSTOMER])

    assert "ApplicationThrottled" in str(caught.value)
    assert [] == graph_fake.sent


def test_a_wrong_client_secret_is_a_permanent_failure_that_names_the_secret(
    graph_fake: GraphFake, app: RegisteredApp
) -> None:
    with (
        pytest.raises(PermanentDeliveryError) as caught,
        sender(graph_fake, app, secret="wrong") as graph,
    ):
        graph.send(reply(), [CUSTOMER])

    assert "client secret is wrong (AADSTS7000215)" in str(caught.value)
    assert f"would not let {MAILBOX} send" in str(caught.value)


def test_an_app_without_mail_send_is_a_permanent_failure_naming_the_permission(
    graph_fake: GraphFake,
) -> None:
    graph_fake.add_mailbox(MAILBOX)
    app = graph_fake.register_app(
        TENANT, CLIENT_ID, SECRET, permissions=("Mail.ReadWrite",)
    )

    with (
        pytest.raises(PermanentDeliveryError) as caught,
        sender(graph_fake, app) as graph,
    ):
        graph.send(reply(), [CUSTOMER])

    assert "ErrorAccessDenied" in str(caught.value)
    assert "Mail.Send" in str(caught.value)


def test_a_failed_draft_is_deleted_so_a_retry_leaves_none_behind(
    graph_fake: GraphFake,
) -> None:
    graph_fake.add_mailbox(MAILBOX)
    # Drafts may be written but not sent: the send fails after the uploads.
    app = graph_fake.register_app(
        TENANT, CLIENT_ID, SECRET, permissions=("Mail.ReadWrite",)
    )

    with pytest.raises(PermanentDeliveryError), sender(graph_fake, app) as graph:
        graph.send(reply(("big.pdf", os.urandom(3_500_000))), [CUSTOMER])

    assert 1 == graph_fake.count("POST", r"/messages$")
    assert [] == graph_fake.messages(MAILBOX, "drafts")


def test_the_sender_process_sends_a_reply_through_exchange_online(
    graph_fake: GraphFake,
    app: RegisteredApp,
    catalog: Catalog,
    settings: Settings,
    tmp_path: Path,
) -> None:
    channel = catalog.add_channel(
        "exchange",
        address=MAILBOX,
        outbound=graph_fake.account(app, MAILBOX).model_dump(mode="json"),
        secrets={"client_secret": SECRET},
    )
    reply_email = OutboundEmail(
        idempotency_key=f"graph-{uuid.uuid4()}",
        channel_id=channel.id,
        to=[Address(email=CUSTOMER)],
        subject="Re: my order",
        text_body="Your order is on its way.",
    )

    service = Service("sender", service_env(settings), tmp_path)
    try:
        publish_replies(settings, reply_email)
        [status] = statuses(settings, 1)
    finally:
        service.stop()

    assert DeliveryState.SENT == status.state, status.detail
    assert "202 Accepted by Microsoft Graph" in status.detail
    [sent] = graph_fake.sent
    assert ("sendMail", [CUSTOMER]) == (sent.via, sent.recipients)
    assert b"Subject: Re: my order" in sent.mime
