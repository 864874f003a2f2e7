"""Large mail through a RabbitMQ node with RabbitMQ 4's 16 MiB message limit.

A 20 MB attachment (about 28 MB of MIME) goes from a mailbox through poller
and router to its campaign queue, and a reply with a 15 MiB attachment goes
out through the sender. Every exchange of the namespace is tapped: a queue of
the test's own gets a copy of each message published, and none may be over
the limit. The node would refuse such a publish by closing the publisher's
channel, which the services would log as a lost connection, and its own log
would say so; both are checked too.
"""

from __future__ import annotations

import hashlib
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest

from shared import blobs, broker, db
from shared.broker import Outgoing
from shared.models import (
    Address,
    AttachmentInfo,
    DeliveryState,
    OutboundAttachment,
    OutboundEmail,
)
from shared.topology import OUTBOUND_KEY, RAW_KEY
from tests.support.dovecot import Dovecot
from tests.support.rabbitmq_node import MAX_MESSAGE_SIZE, RabbitNode
from tests.support.smtp import SmtpServer
from tests.test_faults import (
    DOMAIN,
    FINAL,
    KINDS,
    CampaignSystem,
    Deployment,
    Fleet,
    deploy,
    header_value,
)

MIB = 1024 * 1024
ATTACHMENT_BYTES = 20_000_000
REPLY_ATTACHMENT_BYTES = 15 * MIB
REFUSED = "larger than configured max size"

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def rabbit() -> Iterator[RabbitNode]:
    with RabbitNode(max_message_size=MAX_MESSAGE_SIZE) as node:
        yield node


@pytest.fixture
def deployment(rabbit: RabbitNode, clean_db: str) -> Deployment:
    return deploy(rabbit, clean_db, MAILROOM_SMTP_TIMEOUT_SECONDS="60")


@pytest.fixture
def smtp(smtp_server_factory: Callable[..., SmtpServer]) -> SmtpServer:
    return smtp_server_factory("plain")


class Tap:
    """A queue bound to every exchange of a namespace: a copy of each publish."""

    def __init__(self, deployment: Deployment):
        topology = deployment.topology
        self.url = deployment.url
        self.name = f"{deployment.settings.broker_prefix}.tap"
        connection = broker.connect(self.url, attempts=3)
        try:
            channel = connection.channel()
            channel.queue_declare(self.name, durable=True, auto_delete=False)
            for exchange, key in (
                (topology.raw_exchange, RAW_KEY),
                (topology.routed_exchange, "#"),
                (topology.outbound_exchange, OUTBOUND_KEY),
                (topology.status_exchange, "#"),
            ):
                channel.queue_bind(self.name, exchange, key)
        finally:
            connection.release()

    def sizes(self) -> dict[str, list[int]]:
        """Body sizes of everything tapped so far, by exchange."""
        sizes: dict[str, list[int]] = defaultdict(list)
        connection = broker.connect(self.url, attempts=3)
        try:
            channel = connection.channel()
            while (message := channel.basic_get(self.name)) is not None:
                channel.basic_ack(message.delivery_tag)
                exchange = message.delivery_info["exchange"].rpartition(".")[2]
                sizes[exchange].append(len(bytes(message.body)))
        finally:
            connection.release()
        return dict(sizes)


def payload(size: int, seed: str) -> bytes:
    """Incompressible bytes, the same for the same seed."""
    return random.Random(seed).randbytes(size)


def big_mail(attachment: bytes) -> tuple[str, bytes]:
    message_id = f"large-{uuid.uuid4().hex[:8]}@customer.example"
    message = EmailMessage()
    message["From"] = "Customer <customer@customer.example>"
    message["To"] = f"support@{DOMAIN}"
    message["Subject"] = "The scans you asked for"
    message["Message-ID"] = f"<{message_id}>"
    message.set_content("Attached are the scans.\n")
    message.add_attachment(
        attachment,
        maintype="application",
        subtype="octet-stream",
        filename="scans.bin",
    )
    return message_id, bytes(message)


def wait_until_routed_or_quarantined(
    deployment: Deployment, campaign: CampaignSystem, timeout: float = 240
) -> None:
    deadline = time.monotonic() + timeout
    while (
        not campaign.routed
        and not deployment.query("SELECT id FROM quarantine")
        and time.monotonic() < deadline
    ):
        time.sleep(0.5)


def refusals(rabbit: RabbitNode) -> int:
    return rabbit.log().count(REFUSED)


def lost_connections(fleet: Fleet) -> list[str]:
    return [
        str(line.get("error"))
        for kind in KINDS
        for line in fleet.lines(kind)
        if line.get("event") == "connection lost, reconnecting"
    ]


def test_a_mail_with_a_20_mb_attachment_reaches_its_campaign_under_16_mib(
    rabbit: RabbitNode, deployment: Deployment, dovecot: Dovecot
) -> None:
    user, password = f"l{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    dovecot.add_user(user, password)
    channel = deployment.catalog.add_channel(
        "large",
        address=f"{user}@{DOMAIN}",
        default_campaign="general",
        inbound={
            "type": "imap",
            "host": "127.0.0.1",
            "port": dovecot.imap_port,
            "security": "none",
            "username": user,
        },
        secrets={"inbound_password": password},
    )
    deployment.catalog.set_active(channel.id, True)
    attachment = payload(ATTACHMENT_BYTES, "inbound")
    message_id, raw = big_mail(attachment)
    dovecot.append(user, raw)
    tap = Tap(deployment)
    refused_before = refusals(rabbit)
    campaign = CampaignSystem(deployment, reply=False)
    fleet = Fleet(deployment, ("poller", "router"))
    try:
        wait_until_routed_or_quarantined(deployment, campaign)
    finally:
        fleet.stop()
        campaign.stop()
    quarantined = deployment.query("SELECT reason FROM quarantine")
    published = tap.sizes()

    assert [] == [q["reason"] for q in quarantined]
    [routed] = campaign.routed.values()
    assert message_id == routed.headers.message_id.strip("<>")
    assert [
        AttachmentInfo(
            filename="scans.bin",
            content_type="application/octet-stream",
            size=ATTACHMENT_BYTES,
            sha256=hashlib.sha256(attachment).hexdigest(),
        )
    ] == routed.attachments
    assert routed.raw.is_claim_check
    assert routed.raw.size > 27 * 1000 * 1000
    assert {"raw", "routed"} == set(published)
    assert max(max(s) for s in published.values()) < MAX_MESSAGE_SIZE
    assert campaign.largest_body < MAX_MESSAGE_SIZE
    assert ([], 0) == (lost_connections(fleet), refusals(rabbit) - refused_before)


def test_a_reply_with_a_15_mib_attachment_is_sent_under_16_mib(
    rabbit: RabbitNode, deployment: Deployment, smtp: SmtpServer
) -> None:
    channel = deployment.catalog.add_channel(
        "replies",
        address=f"replies@{DOMAIN}",
        default_campaign="general",
        outbound=smtp.account().model_dump(mode="json"),
    )
    attachment = payload(REPLY_ATTACHMENT_BYTES, "outbound")
    with db.connect(deployment.settings.database_url.get_secret_value()) as conn:
        content = blobs.put(
            conn, attachment, inline_max=deployment.settings.inline_max_bytes
        )
    reply = OutboundEmail(
        idempotency_key=f"large-reply-{uuid.uuid4().hex[:8]}",
        channel_id=channel.id,
        to=[Address(email="customer@customer.example")],
        subject="Your statement",
        text_body="Attached is your statement.",
        attachments=[
            OutboundAttachment(
                filename="statement.pdf",
                content_type="application/pdf",
                content=content,
            )
        ],
    )
    tap = Tap(deployment)
    refused_before = refusals(rabbit)
    campaign = CampaignSystem(deployment, reply=False)
    fleet = Fleet(deployment, ("sender",))
    try:
        deployment.publish(
            Outgoing(
                deployment.topology.outbound_exchange,
                OUTBOUND_KEY,
                reply.to_json(),
                reply.idempotency_key,
            )
        )
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not FINAL & {
            s.state for s in campaign.statuses.get(reply.idempotency_key, [])
        }:
            time.sleep(0.5)
    finally:
        fleet.stop()
        campaign.stop()
    states = [s.state for s in campaign.statuses[reply.idempotency_key]]
    [received] = smtp.messages
    message = message_from_bytes(received.data, policy=policy.default)
    files = {
        part.get_filename(): hashlib.sha256(part.get_content()).hexdigest()
        for part in message.iter_attachments()
    }
    published = tap.sizes()

    assert [DeliveryState.SENT] == states
    assert {"statement.pdf": hashlib.sha256(attachment).hexdigest()} == files
    assert header_value(received.data, b"Message-ID") in {
        s.message_id for s in campaign.statuses[reply.idempotency_key]
    }
    assert {"outbound", "delivery-status"} == set(published)
    assert max(max(s) for s in published.values()) < MAX_MESSAGE_SIZE
    assert campaign.largest_body < MAX_MESSAGE_SIZE
    assert ([], 0) == (lost_connections(fleet), refusals(rabbit) - refused_before)


def test_a_mail_whose_text_body_alone_is_over_16_mib_reaches_its_campaign_under_it(
    rabbit: RabbitNode, deployment: Deployment, dovecot: Dovecot
) -> None:
    # Bodies travel inside the RoutedEmail, not by claim check: a pasted log,
    # or HTML with embedded images, can take it over the node's limit.
    user, password = f"t{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    dovecot.add_user(user, password)
    channel = deployment.catalog.add_channel(
        "long-text",
        address=f"{user}@{DOMAIN}",
        default_campaign="general",
        inbound={
            "type": "imap",
            "host": "127.0.0.1",
            "port": dovecot.imap_port,
            "security": "none",
            "username": user,
        },
        secrets={"inbound_password": password},
    )
    deployment.catalog.set_active(channel.id, True)
    message = EmailMessage()
    message["From"] = "Customer <customer@customer.example>"
    message["To"] = f"support@{DOMAIN}"
    message["Subject"] = "The whole log"
    message["Message-ID"] = f"<long-{uuid.uuid4().hex[:8]}@customer.example>"
    message.set_content(
        "".join(
            f"{n:08d} request handled in 12 ms by worker 7\n" for n in range(400_000)
        )
    )
    dovecot.append(user, bytes(message))
    tap = Tap(deployment)
    refused_before = refusals(rabbit)
    campaign = CampaignSystem(deployment, reply=False)
    fleet = Fleet(deployment, ("poller", "router"))
    try:
        wait_until_routed_or_quarantined(deployment, campaign)
    finally:
        fleet.stop()
        campaign.stop()
    quarantined = deployment.query("SELECT reason FROM quarantine")
    published = tap.sizes()

    assert [] == [q["reason"] for q in quarantined]
    assert [message["Message-ID"]] == [
        r.headers.message_id for r in campaign.routed.values()
    ]
    assert max(max(s) for s in published.values()) < MAX_MESSAGE_SIZE
    assert ([], 0) == (lost_connections(fleet), refusals(rabbit) - refused_before)
