"""Attachment file names: made safe to show and to save, or made up."""

from __future__ import annotations

import re
import unicodedata

_CONTROLS = re.compile(r"[\x00-\x1f\x7f]+")
_UNSAFE_IN_FILENAME = re.compile(r'[<>:"|?*]')
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})

_EXTENSIONS = {
    "text/plain": ".txt",
    "text/html": ".html",
    "text/calendar": ".ics",
    "text/rfc822-headers": ".txt",
    "message/rfc822": ".eml",
    "message/delivery-status": ".txt",
    "message/disposition-notification": ".txt",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
    "application/pdf": ".pdf",
    "application/pkcs7-signature": ".p7s",
    "application/pgp-signature": ".asc",
}


def safe_filename(name: str) -> str:
    """A file name without directories or control characters; '' when unusable.

    Path separators, control and format characters (bidi overrides that hide
    an extension among them) and characters Windows refuses are removed.
    """
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    if not name.isascii():
        name = "".join(
            ch for ch in name if unicodedata.category(ch) not in _UNSAFE_CATEGORIES
        )

    name = _UNSAFE_IN_FILENAME.sub("_", _CONTROLS.sub("", name)).strip().rstrip(".")
    if len(name) > 200:
        stem, dot, extension = name.rpartition(".")
        keep = dot and len(extension) < 10
        name = stem[:190] + dot + extension if keep else name[:200]

    return "" if name in ("", ".", "..") else name


def attachment_name(filename: str, content_type: str, number: int) -> str:
    """The safe form of a part's file name, or one made from its position."""
    safe = safe_filename(filename)
    if safe:
        return safe
    return f"attachment-{number}" + _EXTENSIONS.get(content_type, ".bin")
