"""Composition of outbound mail: headers, bodies, attachments and refusals."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.sender.compose import compose, message_id_for, recipients
from shared.errors import MessageRejected, PermanentDeliveryError
from shared.models import Address, OutboundAttachment, OutboundEmail, Payload
from shared.settings import MIB

SENDER = Address(name="Support Team", email="support@example.com")
MESSAGE_ID = "<0123456789abcdef@example.com>"
DATE = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)


def outbound(**fields: Any) -> OutboundEmail:
    values: dict[str, Any] = {
        "idempotency_key": "reply-1",
        "channel_id": 1,
        "to": [Address(name="Ann Customer", email="ann@example.org")],
        "subject": "Your order",
        "text_body": "Hello Ann,\nyour order has shipped.\n",
    }
    values.update(fields)
    return OutboundEmail(**values)


def attachment(
    filename: str, data: bytes, content_type: str = "application/pdf"
) -> tuple[OutboundAttachment, bytes]:
    info = OutboundAttachment(
        filename=filename, content_type=content_type, content=Payload.of(data)
    )
    return info, data


def build(out: OutboundEmail, *files: tuple[OutboundAttachment, bytes]) -> bytes:
    return compose(
        out,
        sender=SENDER,
        attachments=list(files),
        message_id=MESSAGE_ID,
        attachment_limit=20 * MIB,
        date=DATE,
    )


def parse(raw: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    return message


def header_names(raw: bytes) -> list[str]:
    head = raw.partition(b"\r\n\r\n")[0].decode("ascii")
    return re.findall(r"^([^\s:]+):", head, flags=re.MULTILINE)


def test_a_reply_carries_the_headers_it_was_given() -> None:
    out = outbound(
        to=[Address(name="Zoë Ångström", email="zoe@example.org")],
        cc=[Address(email="team@example.org")],
        reply_to=[Address(name="Support", email="replies@example.com")],
        subject="Re: Ihre Bestellung über Köln",
        in_reply_to="<abc@mail.example.org>",
        references=["<first@mail.example.org>", "<abc@mail.example.org>"],
    )

    message = parse(build(out))

    expected = {
        "From": "Support Team <support@example.com>",
        "To": "Zoë Ångström <zoe@example.org>",
        "Cc": "team@example.org",
        "Reply-To": "Support <replies@example.com>",
        "Subject": "Re: Ihre Bestellung über Köln",
        "Date": "Mon, 06 May 2024 07:08:09 +0000",
        "Message-ID": MESSAGE_ID,
        "In-Reply-To": "<abc@mail.example.org>",
        "References": "<first@mail.example.org> <abc@mail.example.org>",
    }
    assert expected == {name: str(message[name]) for name in expected}


def test_bcc_recipients_are_in_the_envelope_but_not_in_the_message() -> None:
    out = outbound(bcc=[Address(name="Supervisor", email="boss@example.com")])

    raw = build(out)

    assert ["ann@example.org", "boss@example.com"] == recipients(out)
    assert b"boss@example.com" not in raw
    assert "Bcc" not in header_names(raw)


def test_each_recipient_is_in_the_envelope_once() -> None:
    out = outbound(
        to=[Address(email="ann@example.org"), Address(email="bob@example.org")],
        cc=[Address(email="ANN@example.org")],
        bcc=[Address(email="bob@example.org"), Address(email="eve@example.org")],
    )

    assert ["ann@example.org", "bob@example.org", "eve@example.org"] == recipients(out)


def test_a_domain_in_unicode_is_sent_in_its_ascii_form() -> None:
    out = outbound(to=[Address(email="kunde@bücher.example")])

    message = parse(build(out))

    assert ["kunde@xn--bcher-kva.example"] == recipients(out)
    assert "kunde@xn--bcher-kva.example" == message["To"].addresses[0].addr_spec


def test_text_and_html_become_alternatives_of_one_message() -> None:
    out = outbound(text_body="Grüße\n", html_body="<p>Grüße</p>\n")

    message = parse(build(out))

    parts = [
        (part.get_content_type(), part.get_content().replace("\r\n", "\n"))
        for part in message.iter_parts()
    ]
    assert "multipart/alternative" == message.get_content_type()
    assert [("text/plain", "Grüße\n"), ("text/html", "<p>Grüße</p>\n")] == parts


def test_an_html_only_message_is_a_single_html_part() -> None:
    out = outbound(text_body="", html_body="<p>Hi</p>\n")

    message = parse(build(out))

    assert ("text/html", "<p>Hi</p>\r\n") == (
        message.get_content_type(),
        message.get_content(),
    )


def test_attachments_keep_their_bytes_type_and_non_ascii_filenames() -> None:
    pdf = attachment("Rechnung März 日本.pdf", b"%PDF-1.7\n" + bytes(range(256)))
    image = attachment("photo.png", b"\x89PNG\r\n\x1a\n" * 50, "image/png")
    out = outbound(html_body="<p>See attached</p>")

    raw = build(out, pdf, image)

    expected = [
        ("Rechnung März 日本.pdf", "application/pdf", pdf[1]),
        ("photo.png", "image/png", image[1]),
    ]
    found = [
        (part.get_filename(), part.get_content_type(), part.get_content())
        for part in parse(raw).iter_attachments()
    ]
    assert expected == found
    assert b"filename*" in raw


def test_an_attachment_of_a_container_type_is_sent_as_opaque_bytes() -> None:
    mail = attachment("forwarded.eml", b"Subject: hi\r\n\r\nbody\r\n", "message/rfc822")

    raw = build(outbound(), mail)

    found = [
        (part.get_content_type(), part.get_content())
        for part in parse(raw).iter_attachments()
    ]
    assert [("application/octet-stream", mail[1])] == found


def test_an_automatic_reply_says_so_and_a_personal_one_does_not() -> None:
    automatic = parse(build(outbound(automatic=True)))
    personal = parse(build(outbound(automatic=False)))

    assert ("auto-replied", "All") == (
        automatic["Auto-Submitted"],
        automatic["X-Auto-Response-Suppress"],
    )
    assert (None, None) == (
        personal["Auto-Submitted"],
        personal["X-Auto-Response-Suppress"],
    )


def test_the_message_is_ascii_with_crlf_line_ends_and_short_lines() -> None:
    out = outbound(
        subject="Ünïcödé " * 30,
        text_body="ä" * 5000 + "\n.leading dot\n",
        html_body="<p>" + "x" * 3000 + "</p>",
    )

    raw = build(out, attachment("a.bin", bytes(range(256)) * 100))

    lines = raw.split(b"\r\n")
    assert (True, False, True) == (
        raw.isascii(),
        any(b"\n" in line or b"\r" in line for line in lines),
        max(len(line) for line in lines) <= 78,
    )


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"subject": "Hi\r\nBcc: eve@evil.example"}, "subject"),
        ({"subject": "Hi\u2028Bcc: eve@evil.example"}, "subject"),
        ({"subject": "Hi\u2029Bcc: eve@evil.example"}, "subject"),
        ({"subject": "Hi\x85Bcc: eve@evil.example"}, "subject"),
        ({"subject": "Hi\x00there"}, "subject"),
        (
            {
                "to": [
                    Address.model_construct(
                        name="Ann\nBcc: e@evil.example", email="a@b.example"
                    )
                ]
            },
            "to name",
        ),
        (
            {"to": [Address(name="Ann\u2028Bcc: e@evil.example", email="a@b.example")]},
            "to name",
        ),
        (
            {
                "cc": [
                    Address.model_construct(
                        name="", email="a@b.example\r\nBcc: e@evil.example"
                    )
                ]
            },
            "cc",
        ),
        (
            {
                "reply_to": [
                    Address(name="", email="a@b.example\u0085Bcc: e@evil.example")
                ]
            },
            "reply_to",
        ),
        ({"in_reply_to": "<a@b.example>\r\nBcc: e@evil.example"}, "in_reply_to"),
        ({"references": ["<a@b.example>\nBcc: e@evil.example"]}, "references"),
        ({"references": ["<a@b.example>\u2028Bcc: e@evil.example"]}, "references"),
    ],
)
def test_a_value_that_would_add_a_header_is_refused(
    fields: dict[str, Any], field: str
) -> None:
    # model_construct skips the model's own checks: compose must not rely on them.
    out = OutboundEmail.model_construct(**{**dict(outbound()), **fields})

    with pytest.raises(MessageRejected) as refused:
        build(out)

    assert str(refused.value).startswith(field)


def test_an_attachment_filename_that_would_add_a_header_is_refused() -> None:
    evil = attachment("a.pdf\r\nBcc: eve@evil.example", b"%PDF")

    with pytest.raises(MessageRejected) as refused:
        build(outbound(), evil)

    assert "attachment filename contains the control character U+000D" in str(
        refused.value
    )


def test_a_name_that_would_decode_into_an_address_is_refused() -> None:
    # Encoded-word syntax passes every character check; only reading the
    # generated header back shows it does not say what was written.
    disguised = Address(name="=?utf-8?q?eve=40evil=2Eexample?=", email="a@b.example")

    with pytest.raises(MessageRejected) as refused:
        build(outbound(to=[disguised]))

    assert "its To header does not read back as written" in str(refused.value)


def test_an_address_mailroom_cannot_send_to_is_refused() -> None:
    out = outbound(to=[Address(email="two words@example.org")])

    with pytest.raises(MessageRejected) as refused:
        recipients(out)

    assert "to address 'two words@example.org' is not one" in str(refused.value)


def test_a_message_without_recipients_is_refused() -> None:
    with pytest.raises(MessageRejected) as refused:
        build(outbound(to=[]))

    assert "the message has no To, Cc or Bcc address" == str(refused.value)


def test_attachments_over_the_limit_are_refused_naming_the_file_and_limit() -> None:
    first = attachment("first.bin", bytes(12 * MIB))
    second = attachment("second.bin", bytes(9 * MIB))

    with pytest.raises(PermanentDeliveryError) as refused:
        build(outbound(), first, second)

    assert (
        "attachment 'second.bin' brings the attachments to 22,020,096 bytes, "
        "over the limit of 20,971,520 bytes"
    ) in str(refused.value)


def test_attachments_exactly_at_the_limit_are_sent() -> None:
    files = [attachment("a.bin", b"a" * 6), attachment("b.bin", b"b" * 4)]

    raw = compose(
        outbound(),
        sender=SENDER,
        attachments=files,
        message_id=MESSAGE_ID,
        attachment_limit=10,
    )

    assert 2 == len(list(parse(raw).iter_attachments()))


def test_an_attachment_that_does_not_match_its_checksum_is_refused() -> None:
    info, _data = attachment("report.pdf", b"%PDF original")

    with pytest.raises(MessageRejected) as refused:
        build(outbound(), (info, b"%PDF damaged!"))

    assert "attachment 'report.pdf' does not match its SHA-256" in str(refused.value)


def test_the_message_id_is_the_same_for_every_retry_of_one_email() -> None:
    first = message_id_for("reply-1", "example.com")
    retry = message_id_for("reply-1", "example.com")
    other = message_id_for("reply-2", "example.com")

    assert (True, False) == (first == retry, first == other)
    assert re.fullmatch(r"<[0-9a-f]{32}@example\.com>", first)


def test_the_message_id_goes_into_the_message() -> None:
    message_id = message_id_for("reply-1", "bücher.example")

    message = compose(
        outbound(),
        sender=SENDER,
        attachments=[],
        message_id=message_id,
        attachment_limit=MIB,
    )

    assert message_id == str(parse(message)["Message-ID"])
    assert message_id.endswith("@xn--bcher-kva.example>")


text = st.text(st.characters(codec="utf-8"), max_size=120)


@settings(max_examples=150, deadline=None)
@given(name=text, subject=text, filename=text)
def test_no_name_subject_or_filename_adds_a_header_or_recipient(
    name: str, subject: str, filename: str
) -> None:
    out = OutboundEmail.model_construct(
        **{
            **dict(outbound()),
            "to": [Address.model_construct(name=name, email="ann@example.org")],
            "subject": subject,
        }
    )

    try:
        raw = build(out, attachment(filename, b"data"))
    except MessageRejected:
        return

    message = parse(raw)
    expected = (["ann@example.org"], 1)
    assert expected == (
        [a.addr_spec for a in message["To"].addresses],
        len(list(message.iter_attachments())),
    )
    assert (
        {"From", "To", "Date", "Message-ID", "MIME-Version", "Content-Type"}
        <= set(header_names(raw))
        <= {
            "From",
            "To",
            "Subject",
            "Date",
            "Message-ID",
            "MIME-Version",
            "Content-Type",
        }
    )
