"""IMAP IDLE watchers: new mail wakes the poller within a second.

One connection per channel, on the channel's inbox only: other folders are
polled on the interval, so a mailbox with many folders costs the server one
extra connection, not one per folder. A watcher never fetches mail itself; it
asks the poller to poll the channel now, so checkpoints stay in one place.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from services.poller.imap import ImapMailbox
from shared.accounts import ImapAccount
from shared.errors import ChannelError
from shared.logs import get_logger
from shared.xoauth2 import Bearer

log = get_logger(__name__)

RENEW_SECONDS = 600.0
MAX_BACKOFF_SECONDS = 300.0


class IdleWatcher:
    def __init__(
        self,
        channel_id: int,
        account: ImapAccount,
        credential: str | Bearer,
        *,
        wake: Callable[[int], None],
        timeout: float,
    ):
        self.channel_id = channel_id
        self.account = account
        self._credential = credential
        self._wake = wake
        self._timeout = timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"idle-{channel_id}", daemon=True
        )

    def __repr__(self) -> str:
        return f"IdleWatcher(channel {self.channel_id}, {self.account.host})"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the watcher to leave IDLE; it does within about a second."""
        self._stop.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                with ImapMailbox(
                    self.account, self._credential, timeout=self._timeout
                ) as mailbox:
                    if not mailbox.supports_idle():
                        log.info(
                            "server has no IDLE; the channel is polled on the "
                            "interval only",
                            channel_id=self.channel_id,
                        )
                        return
                    log.info("watching with IDLE", channel_id=self.channel_id)
                    backoff = 1.0
                    self._watch(mailbox)
            except ChannelError as exc:
                log.warning(
                    "IDLE connection failed, retrying",
                    channel_id=self.channel_id,
                    error=str(exc),
                    in_seconds=backoff,
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    def _watch(self, mailbox: ImapMailbox) -> None:
        while not self._stop.is_set():
            if mailbox.wait_for_new_mail(
                self.account.folder, self._stop, renew_seconds=RENEW_SECONDS
            ):
                self._wake(self.channel_id)
