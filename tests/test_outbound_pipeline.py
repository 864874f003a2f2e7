"""End to end: OutboundEmail on the broker, delivered by a sender process to SMTP."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from shared import blobs, db
from shared.catalog import Catalog, Channel
from shared.models import (
    Address,
    DeliveryState,
    OutboundAttachment,
    OutboundEmail,
)
from shared.settings import Settings
from tests.support.outbound import publish_replies, statuses
from tests.support.processes import Service, service_env
from tests.support.smtp import SmtpServer

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
MIB = 1024 * 1024


@pytest.fixture
def smtp(smtp_server_factory: Callable[..., SmtpServer]) -> SmtpServer:
    return smtp_server_factory("starttls", username="agent", password="s3cret-pw")


@pytest.fixture
def channel(catalog: Catalog, smtp: SmtpServer) -> Channel:
    catalog.add_campaign("general", "General")
    return catalog.add_channel(
        "support",
        address="support@example.test",
        default_campaign="general",
        outbound=smtp.account().model_dump(mode="json"),
        secrets={"outbound_password": "s3cret-pw"},
    )


@pytest.fixture
def sender(settings: Settings, channel: Channel) -> Iterator[Service]:
    ARTIFACTS.mkdir(exist_ok=True)
    service = Service("sender", service_env(settings), ARTIFACTS)
    yield service
    service.stop()


def attachment(settings: Settings, name: str, data: bytes) -> OutboundAttachment:
    with db.connect(settings.database_url.get_secret_value()) as conn:
        content = blobs.put(conn, data, inline_max=settings.inline_max_bytes)
    return OutboundAttachment(
        filename=name, content_type="application/pdf", content=content
    )


def test_an_outbound_email_arrives_at_the_smtp_server_with_its_headers_body_and_files(
    settings: Settings, channel: Channel, smtp: SmtpServer, sender: Service
) -> None:
    small = b"%PDF-1.4 small\n" * 100
    large = bytes(range(256)) * (3 * MIB // 256)
    reply = OutboundEmail(
        idempotency_key=f"reply-{uuid.uuid4()}",
        channel_id=channel.id,
        to=[Address(name="Zoë Customer", email="zoe@customer.example")],
        cc=[Address(email="team@customer.example")],
        bcc=[Address(email="audit@example.test")],
        subject="Re: Your refund – order 42",
        text_body="Hello Zoë,\n\nyour refund is on its way.\n",
        html_body="<p>Hello Zoë,</p><p>your refund is on its way.</p>",
        attachments=[
            attachment(settings, "receipt.pdf", small),
            attachment(settings, "statement é.pdf", large),
        ],
        in_reply_to="<question-1@customer.example>",
        references=["<question-1@customer.example>"],
    )

    publish_replies(settings, reply)
    [status] = statuses(settings, 1)
    [received] = smtp.wait_for(1, timeout=30)

    assert DeliveryState.SENT == status.state, status.detail
    message = message_from_bytes(received.data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    assert "support@example.test" == received.mail_from
    assert {"zoe@customer.example", "team@customer.example", "audit@example.test"} == (
        set(received.rcpt_tos)
    )
    assert received.tls and "agent" == received.login
    assert "Re: Your refund – order 42" == message["Subject"]
    assert "Zoë Customer <zoe@customer.example>" == str(message["To"])
    assert message["Bcc"] is None
    assert "<question-1@customer.example>" == message["In-Reply-To"]
    assert status.message_id == message["Message-ID"]
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and "refund is on its way" in text.get_content()
    assert html is not None and "<p>Hello Zoë,</p>" in html.get_content()
    files = {a.get_filename(): a.get_content() for a in message.iter_attachments()}
    assert {"receipt.pdf": small, "statement é.pdf": large} == files


def test_an_outbound_email_is_sent_once_however_often_it_is_published(
    settings: Settings, channel: Channel, smtp: SmtpServer, sender: Service
) -> None:
    email = OutboundEmail(
        idempotency_key=f"once-{uuid.uuid4()}",
        channel_id=channel.id,
        to=[Address(email="zoe@customer.example")],
        subject="Only once",
        text_body="Hi",
    )

    publish_replies(settings, email, email)
    states = sorted(s.state for s in statuses(settings, 2))

    assert [DeliveryState.DUPLICATE, DeliveryState.SENT] == states
    assert 1 == len(smtp.messages)


def test_an_outbound_email_with_attachments_over_20_mib_is_refused_and_reported(
    settings: Settings, channel: Channel, smtp: SmtpServer, sender: Service
) -> None:
    too_big = OutboundEmail(
        idempotency_key=f"big-{uuid.uuid4()}",
        channel_id=channel.id,
        to=[Address(email="zoe@customer.example")],
        subject="Huge",
        text_body="see attached",
        attachments=[attachment(settings, "huge.bin", b"\x01" * (20 * MIB + 1))],
    )

    publish_replies(settings, too_big)
    [status] = statuses(settings, 1)

    assert DeliveryState.FAILED == status.state
    assert "huge.bin" in status.detail
    assert [] == smtp.messages
    with db.connect(settings.database_url.get_secret_value()) as conn:
        row = conn.execute(
            "SELECT state FROM outbound_deliveries WHERE idempotency_key = %s",
            (too_big.idempotency_key,),
        ).fetchone()
    assert {"state": "failed"} == row
