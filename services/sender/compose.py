"""The MIME message the sender delivers for one ``OutboundEmail``.

The standard library builds, encodes and folds the message. Some Python
releases (3.11.7 among them) can fold a header so that an encoded line break
comes out as a real one, which lets a crafted value add headers or
recipients. So every header value and address is checked before it goes in,
and the generated header blocks are parsed back and compared with what was
meant: a message that would say more than intended is refused, not sent.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from datetime import UTC, datetime
from email import policy
from email.errors import MessageError
from email.headerregistry import Address as MailAddress
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import format_datetime
from typing import NoReturn

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
FIELD = re.compile(rb"^[!-9;-~]+:")
# Categories of characters no header value may hold: control characters
# (CR, LF, NUL, NEL...), line and paragraph separators, lone surrogates.
FORBIDDEN = frozenset({"Cc", "Zl", "Zp", "Cs"})
PART_FIELDS = frozenset(
    {"content-type", "content-transfer-encoding", "content-disposition"}
)
MIME_FIELDS = PART_FIELDS | {"mime-version"}
# Top-level multiparts cannot be attached as they are: their structure would
# merge with the message's own.
OPAQUE_TYPES = ("multipart/", "message/")

Intended = str | list[tuple[str, str]]


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
    files = [_attachment(info, data) for info, data in attachments]
    try:
        raw = _generate(out, headers, files)
    except (ValueError, MessageError) as exc:
        raise MessageRejected(
            f"the message could not be built ({exc}); check its addresses, "
            "subject and attachment names"
        ) from exc

    _verify(raw, headers, [(name, kind) for name, kind, _ in files])
    return raw


def _generate(
    out: OutboundEmail,
    headers: list[tuple[str, Intended]],
    files: list[tuple[str, str, bytes]],
) -> bytes:
    message = EmailMessage(policy=POLICY)
    for name, value in headers:
        message[name] = value if isinstance(value, str) else _mail_addresses(value)

    _add_body(message, out)
    for filename, content_type, data in files:
        maintype, subtype = content_type.split("/")
        message.add_attachment(
            data, maintype=maintype, subtype=subtype, filename=filename
        )

    for part in message.walk():
        # add_alternative and add_attachment repeat it in every part.
        if part is not message:
            del part["MIME-Version"]

    return message.as_bytes(policy=POLICY)


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


def _add_body(message: EmailMessage, out: OutboundEmail) -> None:
    text = _body("text_body", out.text_body)
    html = _body("html_body", out.html_body)
    if html and not text:
        message.set_content(html, subtype="html")
        return

    message.set_content(text)
    if html:
        message.add_alternative(html, subtype="html")


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


def _verify(
    raw: bytes,
    headers: list[tuple[str, Intended]],
    files: list[tuple[str, str]],
) -> None:
    """Refuse ``raw`` unless it parses back to exactly what was intended."""
    if not raw.isascii():
        _refuse("it is not plain ASCII")

    head, blank, _ = raw.partition(b"\r\n\r\n")
    if not blank:
        _refuse("it has no end of headers")

    names = _field_names(head)
    intended = [name.lower() for name, _ in headers]
    found = [name for name in names if name not in MIME_FIELDS]
    if sorted(found) != sorted(intended):
        _refuse(f"its headers are {found}, not {intended}")

    if any(names.count(name) > 1 for name in MIME_FIELDS):
        _refuse("it repeats a MIME header")

    parsed = BytesParser(policy=policy.default).parsebytes(raw)
    for name, value in headers:
        if _parsed_value(parsed, name) != _normalized(value):
            _refuse(f"its {name} header does not read back as written")

    attached = [
        (_filename(part), part.get_content_type()) for part in parsed.iter_attachments()
    ]
    if attached != files:
        _refuse("its attachments do not read back as written")

    for part in parsed.walk():
        extra = {name.lower() for name in part.keys()} - PART_FIELDS
        if part is not parsed and extra:
            _refuse(f"a part has the headers {sorted(extra)}")


def _field_names(head: bytes) -> list[str]:
    names: list[str] = []
    for line in head.split(b"\r\n"):
        if b"\r" in line or b"\n" in line or b"\x00" in line:
            _refuse("a header holds a bare line break")

        if line[:1] in (b" ", b"\t") and names:
            continue

        field = FIELD.match(line)
        if field is None:
            _refuse("a header line is neither a field nor a continuation")

        names.append(field.group()[:-1].decode("ascii").lower())

    return names


def _filename(part: EmailMessage) -> str | None:
    # get_filename() strips quotes and angle brackets a name may really have.
    disposition = part.get("Content-Disposition")
    params = getattr(disposition, "params", {})
    return params.get("filename")


def _parsed_value(parsed: EmailMessage, name: str) -> Intended:
    found = parsed.get_all(name, [])
    if len(found) != 1:
        return []

    header = found[0]
    if hasattr(header, "addresses"):
        return _normalized([(a.display_name, a.addr_spec) for a in header.addresses])

    return _normalized(str(header))


def _normalized(value: Intended) -> Intended:
    """``value`` without the white space folding may change.

    The standard parser puts a space between adjacent encoded words of a
    display name, where RFC 2047 says there is none; so names compare
    without white space, addresses exactly.
    """
    if isinstance(value, str):
        return " ".join(value.split())

    return [("".join(name.split()), email) for name, email in value]


def _refuse(reason: str) -> NoReturn:
    raise MessageRejected(
        f"the composed message was not sent because {reason}: a value tried "
        "to add headers or recipients, or holds text that looks like an "
        "encoded word (=?...?=); change it and send again"
    )
