"""The MIME message the sender delivers for one ``OutboundEmail``.

The layout is always the same (mixed > alternative text and html >
attachments), so the MIME structure and bodies are written here: text as
quoted-printable, attachments as base64 written in chunks, boundaries that
hold ``=_``, which neither encoding can produce. The standard library encodes
and folds the headers. Some Python releases (3.11.7 among them) can fold a
header so that an encoded line break comes out as a real one, which lets a
crafted value add headers or recipients. So every header value and address
is checked before it goes in, and ``compose_check.verify`` parses every
generated header block back and compares it with what was meant: a message
that would say more than intended is refused, not sent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import secrets
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.errors import MessageError
from email.headerregistry import Address as MailAddress
from email.message import EmailMessage
from email.utils import format_datetime

from services.sender.compose_check import (
    MIME_VERSION,
    TEXT_HEADERS,
    Intended,
    Shape,
    verify,
)
from shared.accounts import HOSTNAME
from shared.errors import MessageRejected, PermanentDeliveryError
from shared.models import Address, OutboundAttachment, OutboundEmail

# 7bit: bodies are quoted-printable or base64, so the message is plain ASCII
# and needs no 8BITMIME from the server.
POLICY = policy.SMTP.clone(cte_type="7bit")

ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
LOCAL_PART = re.compile(rf"^{ATOM}(\.{ATOM})*$")
MESSAGE_ID = re.compile(r"^<[!-;=?-~]+>$")
CONTENT_TYPE = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$"
)
# Categories of characters no header value may hold: control characters
# (CR, LF, NUL, NEL...), line and paragraph separators, lone surrogates.
FORBIDDEN = frozenset({"Cc", "Zl", "Zp", "Cs"})
# Top-level multiparts cannot be attached as they are: their structure would
# merge with the message's own.
OPAQUE_TYPES = ("multipart/", "message/")

# 57 bytes make one 76-character base64 line; 16,384 lines at a time.
BASE64_SLICE = 57 * 16384


def compose(
    out: OutboundEmail,
    *,
    sender: Address,
    attachments: Sequence[tuple[OutboundAttachment, bytes]],
    message_id: str,
    attachment_limit: int,
    date: datetime | None = None,
) -> bytes:
    """The message as it goes over SMTP: ASCII, CRLF line ends, no Bcc.

    Raises ``PermanentDeliveryError`` when the attachments together are over
    ``attachment_limit`` bytes and ``MessageRejected`` when a value could
    change the message's headers or recipients.
    """
    _check_attachments(attachments, attachment_limit)

    headers = _headers(out, sender, message_id, date or datetime.now(UTC))
    body = _layout(out, [_attachment(info, data) for info, data in attachments])
    try:
        raw = _generate(headers, body)
    except (ValueError, MessageError) as exc:
        raise MessageRejected(
            f"the message could not be built ({exc}); check its addresses, "
            "subject and attachment names"
        ) from exc

    verify(raw, headers, body.shape())
    return raw


@dataclass(frozen=True)
class _Part:
    """One MIME entity: a text body, an attachment or a multipart."""

    content_type: str
    body: bytes = b""
    filename: str | None = None
    parts: tuple[_Part, ...] = ()

    def shape(self) -> Shape:
        return (
            self.content_type,
            self.filename,
            tuple(part.shape() for part in self.parts),
        )


def _layout(out: OutboundEmail, files: list[tuple[str, str, bytes]]) -> _Part:
    text = _body("text_body", out.text_body)
    html = _body("html_body", out.html_body)
    if html and not text:
        body = _text_part("html", html)
    elif html:
        body = _Part(
            "multipart/alternative",
            parts=(_text_part("plain", text), _text_part("html", html)),
        )
    else:
        body = _text_part("plain", text)

    if not files:
        return body

    attached = tuple(
        _Part(content_type, data, filename) for filename, content_type, data in files
    )
    return _Part("multipart/mixed", parts=(body, *attached))


def _text_part(subtype: str, text: str) -> _Part:
    # Every line ends in CRLF, the last one too, as the standard library's
    # set_content writes text; quoted-printable then keeps lines short and
    # turns every "=" into "=3D", so no boundary can appear in it.
    lines = text.encode("utf-8").splitlines()
    data = b"\r\n".join(lines) + b"\r\n"
    return _Part(f"text/{subtype}", binascii.b2a_qp(data, istext=True))


def _generate(headers: list[tuple[str, Intended]], body: _Part) -> bytes:
    message = EmailMessage(policy=POLICY)
    for name, value in headers:
        message[name] = value if isinstance(value, str) else _mail_addresses(value)

    buffer = io.BytesIO()
    _write_headers(buffer, message)
    buffer.write(MIME_VERSION)
    _write_part(buffer, body)
    return buffer.getvalue()


def _write_part(buffer: io.BytesIO, part: _Part) -> None:
    """The part's own headers, a blank line and its body."""
    if part.parts:
        boundary = b"=_" + secrets.token_hex(12).encode("ascii")
        buffer.write(
            b'Content-Type: %s; boundary="%s"\r\n\r\n'
            % (part.content_type.encode("ascii"), boundary)
        )
        buffer.write(b"--%s\r\n" % boundary)
        for index, child in enumerate(part.parts):
            if index:
                buffer.write(b"\r\n--%s\r\n" % boundary)

            _write_part(buffer, child)

        buffer.write(b"\r\n--%s--\r\n" % boundary)
        return

    if part.filename is None:
        buffer.write(TEXT_HEADERS % part.content_type.encode("ascii"))
        buffer.write(part.body)
        return

    headers = EmailMessage(policy=POLICY)
    headers["Content-Type"] = part.content_type
    headers["Content-Transfer-Encoding"] = "base64"
    headers["Content-Disposition"] = "attachment"
    headers.set_param("filename", part.filename, header="Content-Disposition")
    _write_headers(buffer, headers)
    buffer.write(b"\r\n")

    # In slices, so that only one slice at a time is held twice.
    view = memoryview(part.body)
    for start in range(0, len(view), BASE64_SLICE):
        encoded = base64.encodebytes(view[start : start + BASE64_SLICE])
        buffer.write(encoded.replace(b"\n", b"\r\n"))


def _write_headers(buffer: io.BytesIO, message: EmailMessage) -> None:
    for name, value in message.raw_items():
        buffer.write(POLICY.fold_binary(name, value))


def recipients(out: OutboundEmail) -> list[str]:
    """The envelope recipients: To, Cc and Bcc, each address once."""
    seen: set[str] = set()
    result: list[str] = []
    for field, addresses in (("to", out.to), ("cc", out.cc), ("bcc", out.bcc)):
        for address in addresses:
            email = _email(field, address.email)
            if email.lower() not in seen:
                seen.add(email.lower())
                result.append(email)

    return result


def message_id_for(idempotency_key: str, domain: str) -> str:
    """A Message-ID that every retry of one outbound email shares."""
    if not idempotency_key:
        raise ValueError("an idempotency key is required for a stable Message-ID")

    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
    return f"<{digest}@{_domain('message id domain', domain)}>"


def _headers(
    out: OutboundEmail, sender: Address, message_id: str, date: datetime
) -> list[tuple[str, Intended]]:
    if not (out.to or out.cc or out.bcc):
        raise MessageRejected("the message has no To, Cc or Bcc address")

    headers: list[tuple[str, Intended]] = [("From", [_address("from", sender)])]
    for name, field, addresses in (
        ("To", "to", out.to),
        ("Cc", "cc", out.cc),
        ("Reply-To", "reply_to", out.reply_to),
    ):
        if addresses:
            headers.append((name, [_address(field, a) for a in addresses]))

    if out.subject:
        headers.append(("Subject", _text("subject", out.subject)))

    headers.append(("Date", format_datetime(date)))
    headers.append(("Message-ID", _message_id("message_id", message_id)))
    if out.in_reply_to:
        headers.append(("In-Reply-To", _message_id("in_reply_to", out.in_reply_to)))

    if out.references:
        ids = [_message_id("references", ref) for ref in out.references]
        headers.append(("References", " ".join(ids)))

    if out.automatic:
        headers.append(("Auto-Submitted", "auto-replied"))
        # Exchange and Outlook honour this one rather than Auto-Submitted.
        headers.append(("X-Auto-Response-Suppress", "All"))

    return headers


def _text(field: str, value: str) -> str:
    for char in value:
        if char != "\t" and unicodedata.category(char) in FORBIDDEN:
            raise MessageRejected(
                f"{field} contains the control character U+{ord(char):04X}, "
                "which could add headers or recipients; remove it and send again"
            )

    return value


def _address(field: str, address: Address) -> tuple[str, str]:
    # Runs of white space in a display name do not survive folding.
    name = " ".join(_text(f"{field} name", address.name).split())
    return name, _email(field, address.email)


def _email(field: str, value: str) -> str:
    local, at, domain = _text(field, value).strip().rpartition("@")
    if not at or not LOCAL_PART.match(local) or len(local) > 64:
        raise MessageRejected(
            f"{field} address {value!r} is not one Mailroom can send to: it "
            "needs a plain local part (letters, digits, .!#$%&'*+/=?^_`{|}~-) "
            "and a domain"
        )

    email = f"{local}@{_domain(field, domain)}"
    if len(email) > 254:
        raise MessageRejected(f"{field} address {value!r} is over 254 characters")

    return email


def _domain(field: str, value: str) -> str:
    try:
        domain = value.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise MessageRejected(
            f"{field} domain {value!r} is not a valid domain name"
        ) from exc

    if not HOSTNAME.match(domain):
        raise MessageRejected(f"{field} domain {value!r} is not a valid domain name")

    return domain


def _message_id(field: str, value: str) -> str:
    value = _text(field, value).strip()
    if not value.startswith("<"):
        value = f"<{value}>"

    if not MESSAGE_ID.match(value):
        raise MessageRejected(
            f"{field} {value!r} is not a message id: it must be printable "
            "ASCII without spaces, in angle brackets"
        )

    return value


def _mail_addresses(pairs: list[tuple[str, str]]) -> list[MailAddress]:
    return [MailAddress(display_name=name, addr_spec=email) for name, email in pairs]


def _body(field: str, value: str) -> str:
    if "\x00" in value:
        raise MessageRejected(f"{field} contains a NUL character")

    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MessageRejected(
            f"{field} is not valid Unicode (a lone surrogate at {exc.start})"
        ) from exc

    return value


def _check_attachments(
    attachments: Sequence[tuple[OutboundAttachment, bytes]], limit: int
) -> None:
    total = 0
    for info, data in attachments:
        total += len(data)
        if total > limit:
            raise PermanentDeliveryError(
                f"attachment {info.filename!r} brings the attachments to "
                f"{total:,} bytes, over the limit of {limit:,} bytes "
                "(MAILROOM_ATTACHMENT_LIMIT_BYTES); send fewer or smaller files"
            )

        if info.content.size != len(data):
            raise MessageRejected(
                f"attachment {info.filename!r} is {len(data):,} bytes but "
                f"should be {info.content.size:,}; its stored copy is damaged"
            )

        if hashlib.sha256(data).hexdigest() != info.content.sha256:
            raise MessageRejected(
                f"attachment {info.filename!r} does not match its SHA-256; "
                "its stored copy is damaged"
            )


def _attachment(info: OutboundAttachment, data: bytes) -> tuple[str, str, bytes]:
    filename = _text("attachment filename", info.filename).strip() or "attachment"
    content_type = _text("attachment content type", info.content_type)
    content_type = content_type.split(";")[0].strip().lower()
    if not CONTENT_TYPE.match(content_type) or content_type.startswith(OPAQUE_TYPES):
        content_type = "application/octet-stream"

    return filename, content_type, data
