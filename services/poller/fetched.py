"""One message as a mailbox client handed it over, with where it came from."""

from __future__ import annotations

from dataclasses import dataclass

from shared.models import MailSource


@dataclass(frozen=True)
class Fetched:
    source: MailSource
    data: bytes | None
    """The raw message; None when it was larger than the download limit."""
    size: int
    """The size the server reported, in bytes, downloaded or not."""

    @property
    def oversize(self) -> bool:
        return self.data is None
