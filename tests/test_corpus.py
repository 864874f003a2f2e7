"""Real-world and deliberately broken mail from the shared fixture corpus.

Every file must parse (none of them is so broken that it is not mail) and
give sane results; a few files with known content are checked value by value.
The tests skip when the corpus is not checked out beside this repository.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.router.parsing import ParsedEmail, parse_email
from shared.models import Flag
from tests.conftest import CORPUS

FILES = sorted(CORPUS.rglob("*.eml")) if CORPUS.is_dir() else []
LIMIT = 20 * 1024 * 1024

pytestmark = pytest.mark.skipif(not FILES, reason=f"no corpus at {CORPUS}")


def parse(relative: str) -> ParsedEmail:
    return parse_email((CORPUS / relative).read_bytes(), attachment_limit=LIMIT)


def header_strings(parsed: ParsedEmail) -> list[str]:
    headers = parsed.headers
    addresses = headers.from_ + headers.to + headers.cc + headers.reply_to
    return [
        headers.subject,
        headers.message_id,
        headers.in_reply_to,
        *headers.references,
        *(a.name for a in addresses),
        *(a.email for a in addresses),
        parsed.sender_text,
    ]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CORPUS)))
def test_corpus_file_parses_to_sane_results(path: Path) -> None:
    parsed = parse_email(path.read_bytes(), attachment_limit=LIMIT)

    bad_header = [s for s in header_strings(parsed) if re.search(r"[\r\n\x00]", s)]
    assert [] == bad_header
    assert parsed.headers.message_id != ""
    for attachment in parsed.attachments:
        assert attachment.size >= 0
        assert re.fullmatch(r"[0-9a-f]{64}", attachment.sha256)
        assert attachment.filename.strip() != ""
        assert not re.search(r"[/\\\x00-\x1f]", attachment.filename)
        assert "/" in attachment.content_type
    assert bool(parsed.defects) == (Flag.PARSE_DEFECTS in parsed.flags)
    assert len(set(parsed.flags)) == len(parsed.flags)
    for text in (parsed.text_body, parsed.html_body, parsed.body_text):
        text.encode("utf-8")
    parsed.headers.model_dump_json()


def test_corpus_has_the_files_it_is_documented_to_have() -> None:
    assert 142 == len(FILES)


def test_japanese_utf8_subject_and_display_name() -> None:
    parsed = parse("mikel-mail/multi_charset/japanese.eml")

    assert "まみむめも" == parsed.headers.subject
    assert "みける" == parsed.headers.to[0].name
    assert parsed.text_body.startswith("かきくえこ")


def test_iso_2022_jp_body() -> None:
    parsed = parse("mikel-mail/multi_charset/japanese_iso_2022.eml")

    assert "すみません。" == parsed.text_body.strip()


def test_shift_jis_body() -> None:
    parsed = parse("mikel-mail/multi_charset/japanese_shift_jis.eml")

    assert parsed.text_body.startswith(
        "あいうえお\n\nこのメールはテスト用のメールです。"
    )


def test_ks_c_5601_1987_body() -> None:
    parsed = parse("mikel-mail/multi_charset/ks_c_5601-1987.eml")

    assert "스티해" == parsed.text_body.strip()


def test_rfc2047_attachment_name_in_japanese() -> None:
    parsed = parse("mikel-mail/multi_charset/japanese_attachment.eml")

    assert ["てすと.txt"] == [a.filename for a in parsed.attachments]


def test_rfc2231_continued_attachment_name() -> None:
    parsed = parse("mikel-mail/multi_charset/japanese_attachment_long_name.eml")

    expected = "かきくけこ" * 5 + ".txt"
    assert [expected] == [a.filename for a in parsed.attachments]


def test_raw_8bit_attachment_name() -> None:
    parsed = parse("mikel-mail/attachment_emails/attachment_nonascii_filename.eml")

    assert [("ciële.txt", "text/plain")] == [
        (a.filename, a.content_type) for a in parsed.attachments
    ]


def test_unknown_charset_x_unknown_is_read_with_a_defect() -> None:
    parsed = parse("mikel-mail/plain_emails/raw_email10.eml")

    assert parsed.text_body.startswith("Test test. Hi. Waving. m")
    assert "Envoyé par le service de messagerie texte" in parsed.text_body
    assert ["unknown charset 'x-unknown', decoded as utf-8"] == parsed.defects


def test_raw_utf8_headers() -> None:
    parsed = parse("mikel-mail/rfc6532/utf8_headers.eml")

    assert "Säying Hello" == parsed.headers.subject
    assert "Jöhn Doe <jdöe@mächine.example>" == parsed.sender_text


def test_forwarded_message_is_an_attachment() -> None:
    parsed = parse("mikel-mail/attachment_emails/attachment_message_rfc822.eml")

    assert "testing" == parsed.headers.subject
    assert [("ForwardedMessage.eml", "message/rfc822")] == [
        (a.filename, a.content_type) for a in parsed.attachments
    ]


def test_nested_multipart_is_not_an_attachment() -> None:
    parsed = parse("mikel-mail/mime_emails/raw_email_with_nested_attachment.eml")

    assert ["truncated.png", "smime.p7s"] == [a.filename for a in parsed.attachments]
    assert parsed.text_body != ""


def test_delivery_report_is_a_bounce() -> None:
    parsed = parse("mikel-mail/multipart_report_emails/multi_address_bounce1.eml")

    assert Flag.BOUNCE in parsed.flags
    assert ["message/delivery-status", "message/rfc822"] == [
        a.content_type for a in parsed.attachments
    ]


def test_unquoted_boundary_with_equals_sign_is_split() -> None:
    parsed = parse("mikel-mail/mime_emails/raw_email_with_illegal_boundary.eml")

    assert parsed.text_body.startswith("Hello\nThis is an outlook test")
    assert parsed.html_body != ""


def test_stray_line_in_header_does_not_lose_the_header() -> None:
    parsed = parse("mikel-mail/plain_emails/raw_email_incorrect_header.eml")

    assert "Stop adware/spyware once and for all." == parsed.headers.subject
    assert parsed.text_body.startswith("You are infected with:")


def test_missing_close_delimiters_in_dovecot_torture_case() -> None:
    parsed = parse("stalwart-mail-parser/malformed/012.eml")

    assert ["CloseBoundaryNotFoundDefect"] == parsed.defects
    assert 3 == len(parsed.attachments)
