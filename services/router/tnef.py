"""The attachments and body that Outlook wrapped in a TNEF part (winmail.dat).

tnefparse decodes the stream once tnef_check has found its framing sound.
Names come from the long file name when there is one, else the title, read
in the stream's code page; content types are guessed from the names. The
body is the plain text, else the HTML. A body held only as compressed RTF is
left out: turning RTF into text would take a converter this router does not
carry, and Outlook writes a plain text body beside it in most messages.
"""

from __future__ import annotations

import logging
import mimetypes
from dataclasses import dataclass
from typing import Any

from tnefparse.properties import MAPI_ATTACH_LONG_FILENAME
from tnefparse.tnef import TNEF

from services.router import tnef_check
from services.router.decoding import Defects, decode_text, excerpt

# tnefparse logs what it finds wrong with its input as warnings and errors of
# its own; here that becomes the message's defects instead.
logging.getLogger("tnefparse").setLevel(logging.CRITICAL)

TNEF_TYPE = "application/ms-tnef"
TNEF_NAME = "winmail.dat"

# Python's built-in table only, so a name gets the same type on every host.
_TYPES = mimetypes.MimeTypes()
_DEFAULT_CODEPAGE = "cp1252"


@dataclass(frozen=True)
class TnefFile:
    name: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Unpacked:
    files: list[TnefFile]
    text_body: str | None
    html_body: str | None


@dataclass(frozen=True)
class Unreadable:
    reason: str


def is_tnef(content_type: str, filename: str) -> bool:
    return content_type == TNEF_TYPE or filename.strip().lower() == TNEF_NAME


def unpack(data: bytes, defects: Defects) -> Unpacked | Unreadable:
    """What a TNEF stream holds, or why it cannot be read."""
    problem = tnef_check.check(data)
    if problem is not None:
        return Unreadable(problem)

    try:
        tnef = TNEF(data, do_checksum=False)
        codepage = tnef.codepage or _DEFAULT_CODEPAGE
        files = [_file(item, codepage, defects) for item in tnef.attachments]
        text = _body(tnef.body, codepage, defects)
        html = _body(tnef.htmlbody, codepage, defects)
    # The framing is checked, but tnefparse still fails on bad values inside
    # it (dates, code pages, string encodings) with exceptions of every kind;
    # any of them means only that this part stays packed.
    except Exception as exc:  # noqa: BLE001
        return Unreadable(f"{type(exc).__name__}: {excerpt(str(exc))}")
    return Unpacked(files, text, html)


def _file(item: Any, codepage: str, defects: Defects) -> TnefFile:
    long_names = [
        a.data for a in item.mapi_attrs if a.name == MAPI_ATTACH_LONG_FILENAME
    ]
    # tnefparse reads titles as UTF-8 only, but Outlook writes them in the
    # message's code page, so the raw title is decoded here.
    raw = long_names[0] if long_names else item._name
    name = _text(raw, codepage, defects).strip("\x00")
    content_type = _TYPES.guess_type(name, strict=False)[0] if name else None
    return TnefFile(name, content_type or "application/octet-stream", bytes(item.data))


def _body(value: Any, codepage: str, defects: Defects) -> str | None:
    text = _text(value, codepage, defects).rstrip("\x00")
    if not text.strip():
        return None
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    return text.replace("\x00", "\ufffd")


def _text(value: Any, codepage: str, defects: Defects) -> str:
    if isinstance(value, list):
        value = value[0] if value else ""
    if isinstance(value, bytes | bytearray):
        return decode_text(bytes(value), codepage, defects)
    return value if isinstance(value, str) else ""
