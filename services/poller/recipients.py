"""Whether a message is addressed to a channel, for "sync when recipient only"."""

from __future__ import annotations

from email.header import decode_header, make_header
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses

RECIPIENT_HEADERS = ("to", "cc", "bcc")
_parser = BytesHeaderParser(policy=compat32)


def _decoded(value: str) -> str:
    try:
        return str(make_header(decode_header(value)))
    except (LookupError, ValueError, UnicodeError):
        return value


def recipients(raw: bytes) -> set[str]:
    """Lower-cased addresses in To, Cc and Bcc, groups and display names removed."""
    headers = _parser.parsebytes(raw)
    values = [
        _decoded(str(value))
        for name in RECIPIENT_HEADERS
        for value in headers.get_all(name, [])
    ]
    return {
        address.strip().lower()
        for _name, address in getaddresses(values)
        if "@" in address
    }


def addressed_to(raw: bytes, address: str) -> bool:
    return address.strip().lower() in recipients(raw)
