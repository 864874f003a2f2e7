"""TNEF (winmail.dat) files built by hand, following Microsoft's MS-OXTNEF.

A TNEF stream is a signature, a legacy key and a run of attribute records:
a level byte (message or attachment), the attribute's id and type in one
little-endian dword, the length of its data, the data, and a checksum that
is the sum of the data bytes modulo 65536. An attachment starts with
attAttachRendData; its attAttachTitle and attAttachData follow. MAPI
property blocks (attMAPIProps) carry what has no legacy attribute, such as
an HTML body.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass, field

SIGNATURE = 0x223E9F78
LEVEL_MESSAGE = 1
LEVEL_ATTACHMENT = 2

# Attribute type (high word) and id (low word), as MS-OXTNEF lists them.
ATT_TNEF_VERSION = 0x0008_9006
ATT_OEM_CODEPAGE = 0x0006_9007
ATT_MESSAGE_CLASS = 0x0007_8008
ATT_BODY = 0x0002_800C
ATT_MAPI_PROPS = 0x0006_9003
ATT_ATTACH_REND_DATA = 0x0006_9002
ATT_ATTACH_TITLE = 0x0001_8010
ATT_ATTACH_DATA = 0x0006_800F
ATT_ATTACHMENT = 0x0006_9005

# What starts the data of an attachment that is itself a message.
EMBEDDED_MESSAGE = bytes.fromhex("0703020000000000c000000000000046")

PT_BINARY = 0x0102
PT_UNICODE = 0x001F
PID_BODY_HTML = 0x1013
PID_ATTACH_LONG_FILENAME = 0x3707


def record(level: int, attribute: int, data: bytes) -> bytes:
    """One attribute record with its checksum."""
    head = struct.pack("<BII", level, attribute, len(data))
    return head + data + struct.pack("<H", sum(data) & 0xFFFF)


def mapi_block(*properties: tuple[int, int, bytes]) -> bytes:
    """A MAPI property block of (type, id, value) with one value each.

    Only the variable-length types (binary, Unicode string) are written:
    a value count of one, the length, then the value padded to four bytes.
    """
    out = bytearray(struct.pack("<I", len(properties)))
    for kind, pid, value in properties:
        out += struct.pack("<HHII", kind, pid, 1, len(value))
        out += value + b"\x00" * (-len(value) % 4)
    return bytes(out)


def _render_data() -> bytes:
    # attRenderData: a file attachment, no position, no rendering size.
    return struct.pack("<HIHHI", 1, 0xFFFFFFFF, 0, 0, 0)


@dataclass
class Attachment:
    title: bytes
    data: bytes
    long_filename: str | None = None


@dataclass
class Tnef:
    body: bytes | None = None
    html: bytes | None = None
    attachments: list[Attachment] = field(default_factory=list)
    codepage: int = 1252
    key: int = 0x1234

    def to_bytes(self) -> bytes:
        out = bytearray(struct.pack("<IH", SIGNATURE, self.key))
        out += record(LEVEL_MESSAGE, ATT_TNEF_VERSION, struct.pack("<I", 0x10000))
        out += record(
            LEVEL_MESSAGE, ATT_OEM_CODEPAGE, struct.pack("<II", self.codepage, 0)
        )
        out += record(LEVEL_MESSAGE, ATT_MESSAGE_CLASS, b"IPM.Microsoft Mail.Note\x00")
        if self.body is not None:
            out += record(LEVEL_MESSAGE, ATT_BODY, self.body)
        if self.html is not None:
            props = mapi_block((PT_BINARY, PID_BODY_HTML, self.html))
            out += record(LEVEL_MESSAGE, ATT_MAPI_PROPS, props)

        for item in self.attachments:
            out += record(LEVEL_ATTACHMENT, ATT_ATTACH_REND_DATA, _render_data())
            out += record(LEVEL_ATTACHMENT, ATT_ATTACH_TITLE, item.title + b"\x00")
            out += record(LEVEL_ATTACHMENT, ATT_ATTACH_DATA, item.data)
            if item.long_filename is not None:
                name = (item.long_filename + "\x00").encode("utf-16-le")
                props = mapi_block((PT_UNICODE, PID_ATTACH_LONG_FILENAME, name))
                out += record(LEVEL_ATTACHMENT, ATT_ATTACHMENT, props)
        return bytes(out)


def winmail_mail(
    tnef: bytes,
    *,
    text: str | None = None,
    subject: str = "With winmail.dat",
    sender: str = "outlook@customer.example",
    message_id: str = "tnef@customer.example",
    content_type: str = "application/ms-tnef",
    filename: str = "winmail.dat",
) -> bytes:
    """A multipart message carrying ``tnef`` base64-encoded, as Outlook sends it."""
    boundary = "tnef-boundary"
    encoded = base64.encodebytes(tnef).replace(b"\n", b"\r\n")
    parts = []
    if text is not None:
        parts.append(
            b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + text.encode() + b"\r\n"
        )
    parts.append(
        f'Content-Type: {content_type}; name="{filename}"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        f'Content-Disposition: attachment; filename="{filename}"\r\n\r\n'.encode()
        + encoded
    )
    body = b"".join(f"--{boundary}\r\n".encode() + p + b"\r\n" for p in parts)
    head = (
        f"From: {sender}\r\n"
        "To: support@example.test\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: <{message_id}>\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
    )
    return head.encode() + body + f"--{boundary}--\r\n".encode()
