"""An Exchange Online mailbox read through Microsoft Graph.

``GraphMailbox`` reads one mailbox with delta queries: each page of new mail
comes with the link to store once the page is published, so a crash repeats a
page and loses none. Processed mail is marked read or moved to a folder.
Requests go through ``shared.graph.GraphClient``.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import Any

import requests

from services.poller.fetched import Fetched
from shared.accounts import GraphAccount
from shared.errors import (
    ChannelConnectError,
    ChannelError,
    ChannelProtocolError,
)
from shared.graph import GraphClient, decoded_json
from shared.logs import get_logger
from shared.models import MailSource, Protocol
from shared.oauth import (
    request_failure,
)

log = get_logger(__name__)

THROTTLE_RETRIES = 4
DELTA_PAGE_SIZE = 50
CHUNK_BYTES = 64 * 1024
# Folders of mail the mailbox's owner wrote or threw away; their sub-folders
# are left out with them.
NOT_CUSTOMER_MAIL = ("sentitems", "drafts", "deleteditems", "outbox")
WELL_KNOWN = frozenset(
    {"archive", "inbox", "junkemail", "deleteditems", "clutter", "conversationhistory"}
)


class GraphMailbox:
    """One Exchange Online mailbox read through Graph; use it as a context manager."""

    def __init__(
        self, account: GraphAccount, secrets: dict[str, str], *, timeout: float
    ):
        self.account = account
        self.client = GraphClient(account, secrets, timeout=timeout)
        self._processed_id: str | None = None

    def __repr__(self) -> str:
        return f"GraphMailbox({self.account.mailbox!r})"

    def __enter__(self) -> GraphMailbox:
        self.client.access_token()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.client.close()

    @property
    def updated_secrets(self) -> dict[str, str]:
        """Store these (encrypted) after a poll: the refresh token may have rotated."""
        return self.client.updated_secrets

    def folders(self, *, all_folders: bool) -> list[str]:
        """Ids of the folders to poll: the inbox, or every folder of customer mail.

        With ``all_folders`` that is the inbox, junk and every other mail folder
        with their child folders, except Sent Items, Drafts, Deleted Items and
        Outbox (and what is under them) and the folder processed mail goes to.
        """
        inbox = self._folder_id("inbox")
        if not all_folders:
            return [inbox]

        skip = {self._folder_id(name) for name in NOT_CUSTOMER_MAIL}
        if self.account.processed_folder:
            skip.add(self.processed_folder_id())

        found = [inbox]
        pending = list(self.client.pages(self.client.user_path("mailFolders")))
        while pending:
            folder = pending.pop(0)
            if folder["id"] in skip:
                continue
            if folder["id"] != inbox:
                found.append(folder["id"])
            if folder.get("childFolderCount", 0):
                path = self.client.user_path(
                    "mailFolders", folder["id"], "childFolders"
                )
                pending.extend(self.client.pages(path))
        return found

    def fetch_new(
        self, folder: str, delta_link: str | None, *, max_bytes: int
    ) -> Iterator[tuple[list[Fetched], str]]:
        """Mail that arrived in a folder since ``delta_link``, a page at a time.

        Each page comes with the link to store once it is published: a next
        link while the round goes on, the delta link that starts the next
        round at its end. Without a link, or when Graph has forgotten it (410
        Gone), the round lists every message in the folder; the router drops
        what it has seen. A message over ``max_bytes`` is reported with its
        size and not downloaded.
        """
        link = delta_link or self._first_delta(folder)
        while True:
            response = self.client.request(
                "GET",
                link,
                expect=(200, 410),
                headers={"Prefer": f"odata.maxpagesize={DELTA_PAGE_SIZE}"},
            )
            if response.status_code == 410:
                if link == self._first_delta(folder):
                    raise ChannelProtocolError(
                        "Microsoft Graph refused a new delta query"
                    )
                log.warning(
                    "Graph forgot the folder's delta link; listing it again",
                    folder=folder,
                )
                link = self._first_delta(folder)
                continue

            page = decoded_json(response)
            downloads = [
                self._download(folder, str(item["id"]), max_bytes)
                for item in page.get("value", [])
                if "@removed" not in item and "id" in item
            ]
            fetched = [item for item in downloads if item is not None]
            following = page.get("@odata.nextLink") or page.get("@odata.deltaLink")
            if not following:
                raise ChannelProtocolError(
                    "a Microsoft Graph delta page had neither a next nor a delta link"
                )
            yield fetched, following

            if "@odata.deltaLink" in page:
                return
            link = following

    def mark_processed(self, folder: str, remote_ids: list[str]) -> None:
        """Mark published messages read, or move them to the processed folder.

        A message someone else moved or deleted meanwhile is passed over.
        """
        destination = (
            self.processed_folder_id() if self.account.processed_folder else None
        )
        for remote_id in remote_ids:
            path = self.client.user_path("messages", remote_id)
            if destination:
                response = self.client.request(
                    "POST",
                    f"{path}/move",
                    json={"destinationId": destination},
                    expect=(200, 201, 404),
                )
            else:
                response = self.client.request(
                    "PATCH", path, json={"isRead": True}, expect=(200, 404)
                )
            if response.status_code == 404:
                log.info(
                    "processed message is gone already",
                    folder=folder,
                    remote_id=remote_id,
                )

    def processed_folder_id(self) -> str:
        """The id of the processed folder: a well-known name, or a path of
        display names from the top of the mailbox such as ``Inbox/Done``."""
        if self._processed_id is not None:
            return self._processed_id

        name = self.account.processed_folder
        if name.lower() in WELL_KNOWN:
            self._processed_id = self._folder_id(name.lower())
            return self._processed_id

        parts = [part for part in name.split("/") if part]
        candidates = list(self.client.pages(self.client.user_path("mailFolders")))
        found: dict[str, Any] | None = None
        for depth, part in enumerate(parts):
            found = next(
                (
                    f
                    for f in candidates
                    if f.get("displayName", "").lower() == part.lower()
                ),
                None,
            )
            if found is None:
                break
            if depth + 1 < len(parts):
                path = self.client.user_path("mailFolders", found["id"], "childFolders")
                candidates = list(self.client.pages(path))

        if found is None:
            raise ChannelError(
                f"mailbox {self.account.mailbox} has no folder {name!r} for processed "
                "mail: create it, or correct the processed folder setting"
            )
        self._processed_id = str(found["id"])
        return self._processed_id

    def _folder_id(self, well_known: str) -> str:
        folder = self.client.json(
            "GET", self.client.user_path("mailFolders", well_known)
        )
        return str(folder["id"])

    def _first_delta(self, folder: str) -> str:
        path = self.client.user_path("mailFolders", folder, "messages", "delta")
        # Only new mail: marking it read or moving it must not bring it back.
        return self.client.url(f"{path}?changeType=created&$select=id,receivedDateTime")

    def _download(self, folder: str, remote_id: str, max_bytes: int) -> Fetched | None:
        """The message's MIME; None when it was deleted or moved meanwhile."""
        source = MailSource(protocol=Protocol.GRAPH, folder=folder, remote_id=remote_id)
        path = self.client.user_path("messages", remote_id, "$value")
        response = self.client.request("GET", path, stream=True, expect=(200, 404))
        with response:
            if response.status_code == 404:
                log.info("message gone before it was fetched", remote_id=remote_id)
                return None

            declared = int(response.headers.get("Content-Length") or 0)
            if declared > max_bytes:
                return Fetched(source, None, declared)

            data = bytearray()
            try:
                for chunk in response.iter_content(CHUNK_BYTES):
                    data.extend(chunk)
                    if len(data) > max_bytes:
                        return Fetched(source, None, max(declared, len(data)))
            except requests.RequestException as exc:
                raise ChannelConnectError(
                    "lost Microsoft Graph while downloading a message: "
                    f"{request_failure(exc)}"
                ) from exc

        return Fetched(source, bytes(data), len(data))
