"""parse_email on hand-written messages, one behaviour per test."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.router.parsing import (
    MAX_DEPTH,
    MAX_PARTS,
    html_to_text,
    parse_email,
    safe_filename,
)
from shared.errors import MessageRejected
from shared.models import Address, Flag

LIMIT = 1024 * 1024


def mail(*headers: str, body: bytes | str = b"Hello.\r\n") -> bytes:
    head = "".join(line + "\r\n" for line in headers).encode("utf-8")
    if isinstance(body, str):
        body = body.encode("utf-8")
    return head + b"\r\n" + body


def multipart(boundary: str, *parts: bytes, kind: str = "mixed") -> bytes:
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in parts)
    return mail(
        "From: a@example.com",
        "Subject: parts",
        f'Content-Type: multipart/{kind}; boundary="{boundary}"',
        body=body + b"--" + boundary.encode() + b"--\r\n",
    )


def part(*headers: str, body: bytes | str = b"") -> bytes:
    return mail(*headers, body=body).removesuffix(b"\r\n")


def test_common_header_fields_are_decoded() -> None:
    raw = mail(
        "From: =?utf-8?q?J=C3=B6rg?= <jorg@example.com>",
        'To: "Doe, Jane" <jane@example.com>, bob@example.com',
        "Cc: Carol <carol@example.com>",
        "Reply-To: replies@example.com",
        "Subject: =?iso-8859-1?q?R=FCckerstattung?= for order 42",
        "Date: Tue, 10 May 2005 15:27:03 -0500",
        "Message-ID: <abc@example.com>",
        "In-Reply-To: <parent@example.com>",
        "References: <root@example.com>\r\n <parent@example.com>",
    )

    headers = parse_email(raw, attachment_limit=LIMIT).headers

    assert [Address(name="Jörg", email="jorg@example.com")] == headers.from_
    assert [
        Address(name="Doe, Jane", email="jane@example.com"),
        Address(name="", email="bob@example.com"),
    ] == headers.to
    assert [Address(name="Carol", email="carol@example.com")] == headers.cc
    assert [Address(name="", email="replies@example.com")] == headers.reply_to
    assert "Rückerstattung for order 42" == headers.subject
    expected_date = datetime(
        2005, 5, 10, 15, 27, 3, tzinfo=timezone(-timedelta(hours=5))
    )
    assert expected_date == headers.date
    assert "<abc@example.com>" == headers.message_id
    assert "<parent@example.com>" == headers.in_reply_to
    assert ["<root@example.com>", "<parent@example.com>"] == headers.references


def test_encoded_words_split_inside_a_character_are_joined() -> None:
    # "€uro" in UTF-8 is e2 82 ac 75 72 6f; the euro sign is cut after 2 bytes.
    first = base64.b64encode(b"\xe2\x82").decode()
    second = base64.b64encode(b"\xacuro").decode()
    raw = mail(f"Subject: =?utf-8?b?{first}?=\r\n =?utf-8?b?{second}?=")

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert "€uro" == parsed.headers.subject


def test_line_breaks_and_nul_in_decoded_headers_become_spaces() -> None:
    raw = mail(
        "From: =?utf-8?q?Eve=0D=0ABcc=3A_x?= <eve@example.com>",
        "Subject: =?utf-8?q?one=0Atwo=00three?=",
    )

    headers = parse_email(raw, attachment_limit=LIMIT).headers

    assert "one two three" == headers.subject
    assert "Eve Bcc: x" == headers.from_[0].name


def test_undeclared_8bit_header_is_read_in_the_body_charset() -> None:
    subject = "件名".encode("shift_jis")
    raw = (
        b"From: a@example.com\r\nSubject: " + subject + b"\r\n"
        b"Content-Type: text/plain; charset=Shift_JIS\r\n\r\n"
        + "本文".encode("shift_jis")
    )

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert ("件名", "本文") == (parsed.headers.subject, parsed.text_body)


def test_unreadable_date_is_none_and_a_defect() -> None:
    raw = mail("From: a@example.com", "Date: Pn, 29 paX 2007 21:13:00 +0100")

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert None is parsed.headers.date
    assert ["unreadable Date header 'Pn, 29 paX 2007 21:13:00 +0100'"] == (
        parsed.defects
    )
    assert Flag.PARSE_DEFECTS in parsed.flags


def test_date_without_zone_is_taken_as_utc() -> None:
    raw = mail("From: a@example.com", "Date: Tue, 10 May 2005 15:27:03 -0000")

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert datetime(2005, 5, 10, 15, 27, 3, tzinfo=UTC) == parsed.headers.date


def test_missing_message_id_is_generated_from_the_content() -> None:
    raw = mail("From: a@example.com", "Subject: one")
    other = mail("From: a@example.com", "Subject: two")

    first = parse_email(raw, attachment_limit=LIMIT)
    again = parse_email(raw, attachment_limit=LIMIT)
    different = parse_email(other, attachment_limit=LIMIT)

    digest = hashlib.sha256(raw).hexdigest()[:32]
    assert f"<{digest}@mailroom.invalid>" == first.headers.message_id
    assert first.headers.message_id == again.headers.message_id
    assert first.headers.message_id != different.headers.message_id
    assert Flag.GENERATED_MESSAGE_ID in first.flags


def test_two_from_headers_give_both_senders_and_a_defect() -> None:
    raw = mail("From: one@example.com", "From: Two <two@example.com>")

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert ["one@example.com", "two@example.com"] == [
        a.email for a in parsed.headers.from_
    ]
    assert "one@example.com, Two <two@example.com>" == parsed.sender_text
    assert "2 From headers" in parsed.defects


def test_sender_text_has_from_and_sender() -> None:
    raw = mail(
        "From: Support Team <support@shop.example>",
        "Sender: =?utf-8?q?B=C3=B6t?= <bounces@mailer.example>",
    )

    parsed = parse_email(raw, attachment_limit=LIMIT)

    expected = "Support Team <support@shop.example>, Böt <bounces@mailer.example>"
    assert expected == parsed.sender_text


def test_sender_text_keeps_the_header_text_when_addresses_are_unreadable() -> None:
    raw = mail("From: tim@example.com concierge@example.com")

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert "tim@example.com concierge@example.com" in parsed.sender_text


def test_mbox_from_line_is_skipped() -> None:
    raw = b"From someone@example.com Sun May  8 19:07:09 2005\r\n" + mail(
        "From: a@example.com", "Subject: mbox"
    )

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert ("mbox", []) == (parsed.headers.subject, parsed.defects)


def test_missing_empty_line_after_the_header_starts_the_body() -> None:
    raw = b"From: a@example.com\r\nSubject: s\r\nHello there,\r\nbody\r\n"

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert "Hello there,\nbody\n" == parsed.text_body
    assert ["MissingHeaderBodySeparatorDefect"] == parsed.defects


def test_stray_line_inside_the_header_is_skipped() -> None:
    raw = b"From: a@example.com\r\ngarbage line\r\nSubject: kept\r\n\r\nbody\r\n"

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert ("kept", "body\n") == (parsed.headers.subject, parsed.text_body)
    assert ["line without a field name in the header skipped"] == parsed.defects


@pytest.mark.parametrize(
    "raw",
    [b"", b"\r\n\r\n", b"\x00\x01\x02binary\xff\xfe", b"just a line of text\n"],
    ids=["empty", "blank lines", "binary", "text without header"],
)
def test_input_without_a_header_field_is_rejected(raw: bytes) -> None:
    with pytest.raises(MessageRejected) as caught:
        parse_email(raw, attachment_limit=LIMIT)

    assert str(caught.value) in (
        "empty message",
        "no header fields; this is not an email",
    )


def test_header_without_body_parses() -> None:
    parsed = parse_email(b"From: a@example.com\r\n", attachment_limit=LIMIT)

    assert ("", "", []) == (parsed.text_body, parsed.body_text, parsed.attachments)


def test_text_body_is_decoded_from_quoted_printable_and_charset() -> None:
    raw = mail(
        "From: a@example.com",
        "Content-Type: text/plain; charset=iso-8859-1",
        "Content-Transfer-Encoding: quoted-printable",
        body=b"Gr=FC=DFe, caf=E9 and a soft=\r\n break\r\n",
    )

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert "Grüße, café and a soft break\n" == parsed.text_body


def test_unknown_charset_is_read_as_utf8_or_latin1_with_a_defect() -> None:
    raw = mail(
        "From: a@example.com",
        "Content-Type: text/plain; charset=X-UNKNOWN",
        body=b"Envoy\xe9\r\n",
    )

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert "Envoyé\n" == parsed.text_body
    assert ["unknown charset 'x-unknown', decoded as latin-1"] == parsed.defects


def test_utf7_lone_surrogate_does_not_reach_the_text() -> None:
    raw = mail(
        "From: a@example.com",
        "Subject: =?utf-7?q?+2D8-?=",
        "Content-Type: text/plain; charset=utf-7",
        body=b"Hi +AGEAYgBj- and +2D8-\r\n",
    )

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert ("Hi abc and ?\n", "?") == (parsed.text_body, parsed.headers.subject)


def test_html_only_message_gives_body_text_from_the_html() -> None:
    html = (
        "<html><head><title>t</title><style>p {color: red}</style></head>"
        "<body><p>Dear&nbsp;team,</p><!-- hidden --><script>alert(1)</script>"
        "<div>I want a <b>refund</b> &amp; more.<br>Thanks</div></body></html>"
    )
    raw = mail("From: a@example.com", "Content-Type: text/html", body=html)

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert ("", html) == (parsed.text_body, parsed.html_body)
    assert "Dear team,\n\nI want a refund & more.\nThanks" == parsed.body_text


def test_alternative_parts_fill_text_and_html_bodies() -> None:
    raw = multipart(
        "alt",
        part("Content-Type: text/plain; charset=utf-8", body="plain ✓"),
        part("Content-Type: text/html; charset=utf-8", body="<p>html ✓</p>"),
        kind="alternative",
    )

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert ("plain ✓", "<p>html ✓</p>", []) == (
        parsed.text_body,
        parsed.html_body,
        parsed.attachments,
    )
    assert "plain ✓" == parsed.body_text


def test_attachment_size_and_hash_are_of_the_decoded_bytes() -> None:
    payload = bytes(range(256)) * 10
    raw = multipart(
        "b1",
        part("Content-Type: text/plain", body="see attached"),
        part(
            'Content-Type: application/pdf; name="invoice.pdf"',
            "Content-Disposition: attachment",
            "Content-Transfer-Encoding: base64",
            body=base64.encodebytes(payload),
        ),
    )

    parsed = parse_email(raw, attachment_limit=LIMIT)

    attachment = parsed.attachments[0]
    assert ("invoice.pdf", "application/pdf") == (
        attachment.filename,
        attachment.content_type,
    )
    assert (len(payload), hashlib.sha256(payload).hexdigest(), False) == (
        attachment.size,
        attachment.sha256,
        attachment.withheld,
    )


def test_attachment_over_the_limit_is_withheld_and_flagged() -> None:
    raw = multipart(
        "b1",
        part("Content-Type: text/plain", body="big one attached"),
        part(
            "Content-Type: application/octet-stream",
            'Content-Disposition: attachment; filename="big.bin"',
            body=b"x" * 2000,
        ),
    )

    parsed = parse_email(raw, attachment_limit=1000)

    assert [(2000, True)] == [(a.size, a.withheld) for a in parsed.attachments]
    assert Flag.ATTACHMENT_OVER_LIMIT in parsed.flags


def test_rfc2231_filename_continuations_are_joined_and_decoded() -> None:
    raw = multipart(
        "b1",
        part(
            "Content-Type: text/plain",
            "Content-Disposition: attachment;\r\n"
            " filename*0*=utf-8''%E3%81%8B%E3%81%8D;\r\n"
            ' filename*1="-notes";\r\n'
            " filename*2*=%C3%A9.txt",
            body="x",
        ),
    )

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert ["かき-notesé.txt"] == [a.filename for a in parsed.attachments]


def test_rfc2047_filename_is_decoded() -> None:
    raw = multipart(
        "b1",
        part(
            "Content-Type: application/pdf; name==?utf-8?B?VGhpcyBpcyBhIHRlc3QucGRm?=",
            body="x",
        ),
    )

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert ["This is a test.pdf"] == [a.filename for a in parsed.attachments]


def test_attachments_without_a_name_get_numbered_names() -> None:
    raw = multipart(
        "b1",
        part("Content-Type: text/plain", body="body"),
        part("Content-Type: image/png", body="png"),
        part("Content-Type: application/x-thing", body="thing"),
        part("Content-Type: text/plain", body="second text part"),
    )

    parsed = parse_email(raw, attachment_limit=LIMIT)

    expected = ["attachment-1.png", "attachment-2.bin", "attachment-3.txt"]
    assert expected == [a.filename for a in parsed.attachments]


def test_forwarded_message_is_an_attachment_and_routing_uses_the_outer_one() -> None:
    inner = mail("From: inner@example.com", "Subject: inner subject", body="inner")
    raw = multipart(
        "b1",
        part("Content-Type: text/plain", body="FYI"),
        part("Content-Type: message/rfc822", body=inner),
    )

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert ("parts", "FYI") == (parsed.headers.subject, parsed.text_body)
    assert [("attachment-1.eml", "message/rfc822", len(inner))] == [
        (a.filename, a.content_type, a.size) for a in parsed.attachments
    ]


def test_nested_multipart_is_walked_not_listed() -> None:
    inner = (
        b'Content-Type: multipart/alternative; boundary="inner"\r\n\r\n'
        b"--inner\r\nContent-Type: text/plain\r\n\r\ndeep text\r\n"
        b"--inner\r\nContent-Type: text/html\r\n\r\n<p>deep</p>\r\n--inner--"
    )
    raw = multipart("outer", inner, part("Content-Type: image/gif", body="GIF"))

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert ("deep text", "<p>deep</p>") == (parsed.text_body, parsed.html_body)
    assert ["image/gif"] == [a.content_type for a in parsed.attachments]


def test_boundary_that_prefixes_a_nested_boundary_does_not_split_it() -> None:
    inner = (
        b'Content-Type: multipart/alternative; boundary="ab"\r\n\r\n'
        b"--ab\r\nContent-Type: text/plain\r\n\r\nnested\r\n--ab--"
    )
    raw = multipart("a", inner, part("Content-Type: image/gif", body="GIF"))

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert ("nested", 1, []) == (
        parsed.text_body,
        len(parsed.attachments),
        parsed.defects,
    )


def test_multipart_without_its_boundary_keeps_the_body_as_text() -> None:
    raw = mail(
        "From: a@example.com",
        'Content-Type: multipart/mixed; boundary="nowhere"',
        body="no parts here\r\n",
    )

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert "no parts here\n" == parsed.text_body
    assert ["StartBoundaryNotFoundDefect"] == parsed.defects


def test_missing_close_delimiter_keeps_the_last_part() -> None:
    raw = mail(
        "From: a@example.com",
        'Content-Type: multipart/mixed; boundary="b"',
        body="--b\r\nContent-Type: text/plain\r\n\r\nlast part\r\n",
    )

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert "last part\n" == parsed.text_body
    assert ["CloseBoundaryNotFoundDefect"] == parsed.defects


def test_nesting_deeper_than_the_cap_stops_with_a_defect() -> None:
    depth = MAX_DEPTH + 5
    body = b"".join(
        f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'.encode()
        for i in range(1, depth)
    )
    raw = b'From: a@example.com\r\nContent-Type: multipart/mixed; boundary="b0"\r\n'
    raw += b"\r\n--b0\r\n" + body + b"Content-Type: text/plain\r\n\r\ndeep\r\n"

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert "" == parsed.text_body
    assert f"MIME nested deeper than {MAX_DEPTH}; the rest is unread" in (
        parsed.defects
    )


def test_more_parts_than_the_cap_stop_with_a_defect() -> None:
    parts = [part("Content-Type: image/gif", body="GIF") for _ in range(MAX_PARTS + 50)]
    raw = multipart("many", *parts)

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert MAX_PARTS - 1 == len(parsed.attachments)
    assert f"more than {MAX_PARTS} MIME parts; the rest is unread" in parsed.defects


def test_invalid_base64_is_decoded_as_far_as_possible() -> None:
    raw = multipart(
        "b1",
        part(
            "Content-Type: application/octet-stream",
            "Content-Transfer-Encoding: base64",
            body=b"aGVsbG8gd29ybGQ",
        ),
    )

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert [len(b"hello world")] == [a.size for a in parsed.attachments]
    assert ["invalid base64; what could be read was decoded"] == parsed.defects


def test_unknown_transfer_encoding_is_read_as_8bit() -> None:
    raw = mail(
        "From: a@example.com",
        "Content-Transfer-Encoding: 7-bit",
        body="as it is",
    )

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert "as it is" == parsed.text_body
    assert ["unknown Content-Transfer-Encoding '7-bit', read as 8bit"] == (
        parsed.defects
    )


@pytest.mark.parametrize(
    ("header", "flag"),
    [
        ("Auto-Submitted: auto-replied", Flag.AUTO_REPLY),
        ("X-Auto-Response-Suppress: All", Flag.AUTO_REPLY),
        ("Precedence: bulk", Flag.AUTO_REPLY),
        ("Precedence: junk", Flag.AUTO_REPLY),
        ("X-Autoreply: yes", Flag.AUTO_REPLY),
        ("Return-Path: <>", Flag.BOUNCE),
        ("List-Id: <support.lists.example>", Flag.MAILING_LIST),
        ("List-Unsubscribe: <mailto:leave@lists.example>", Flag.MAILING_LIST),
    ],
)
def test_header_sets_flag(header: str, flag: Flag) -> None:
    raw = mail("From: a@example.com", "Message-ID: <m@example.com>", header)

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert [flag] == parsed.flags


def test_auto_submitted_no_is_not_an_auto_reply() -> None:
    raw = mail("From: a@example.com", "Message-ID: <m@x>", "Auto-Submitted: no")

    parsed = parse_email(raw, attachment_limit=LIMIT)

    assert [] == parsed.flags


def test_mailer_daemon_and_delivery_reports_are_bounces() -> None:
    daemon = mail("From: MAILER-DAEMON@mx.example", "Message-ID: <m@x>")
    report = multipart(
        "r",
        part("Content-Type: text/plain", body="could not deliver"),
        part("Content-Type: message/delivery-status", body="Status: 5.1.1"),
        kind="report",
    )

    flags = [parse_email(raw, attachment_limit=LIMIT).flags for raw in (daemon, report)]

    assert Flag.BOUNCE in flags[0]
    assert Flag.BOUNCE in flags[1]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\report.pdf", "report.pdf"),
        ("invoice\u202efdp.exe", "invoicefdp.exe"),
        ("bad\x00name\r\n.txt", "badname.txt"),
        ("what?.txt", "what_.txt"),
        ("..", ""),
        ("  ", ""),
        ("trailing dots...", "trailing dots"),
    ],
)
def test_safe_filename(name: str, expected: str) -> None:
    assert expected == safe_filename(name)


def test_html_to_text_survives_unclosed_markup() -> None:
    markup = "<p>keep</p><script>never closed " + "<" * 10_000

    text = html_to_text(markup)

    assert "keep" == text
