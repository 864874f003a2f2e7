"""Exchange Online through Microsoft Graph: signing in, requests, and the mailbox.

``GraphClient`` signs in with msal, as the app itself (client credentials) or
as a person who authorised the channel once (a refresh token, rotated on each
use), and sends Graph requests: a refused token is renewed once, throttling
(429, 503) is waited out within a bound, and every failure becomes a
``ChannelError`` whose text says what to change. Tokens come from
``shared.oauth``. The sender and the admin's "save and authorise" use the
same client.

``GraphMailbox`` reads one mailbox with delta queries: each page of new mail
comes with the link to store once the page is published, so a crash repeats a
page and loses none. Processed mail is marked read or moved to a folder.
"""

from __future__ import annotations

import time
from collections.abc import Container, Iterator, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from services.poller.fetched import Fetched
from shared.accounts import GraphAccount
from shared.errors import (
    ChannelAuthError,
    ChannelConnectError,
    ChannelError,
    ChannelProtocolError,
)
from shared.logs import get_logger
from shared.models import MailSource, Protocol
from shared.oauth import (
    GRAPH_SCOPES,
    HttpSession,
    SignInProblem,
    TokenSource,
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


class GraphClient:
    """Signed-in requests to Graph for one account; close it when done."""

    def __init__(
        self,
        account: GraphAccount,
        secrets: Mapping[str, str],
        *,
        timeout: float,
        max_throttle_wait: float = 60.0,
    ):
        self.account = account
        self.max_throttle_wait = max_throttle_wait
        self._http = HttpSession(timeout, account.ca_file or True)
        self.tokens = TokenSource(account, secrets, GRAPH_SCOPES, http=self._http)
        self._graph = urlsplit(account.graph_url)

    def __repr__(self) -> str:
        return (
            f"GraphClient({self.account.mailbox!r}, tenant={self.account.tenant_id!r}, "
            f"flow={self.account.auth_flow})"
        )

    @property
    def updated_secrets(self) -> dict[str, str]:
        """The secrets to store: the refresh token rotates with each renewal."""
        return self.tokens.updated_secrets

    def close(self) -> None:
        self._http.close()

    # Signing in

    def application(self) -> Any:
        return self.tokens.application()

    def access_token(self) -> str:
        return self.tokens.access_token()

    def keep(self, result: Mapping[str, Any]) -> None:
        self.tokens.keep(result)

    def problem(self, result: Mapping[str, Any]) -> SignInProblem:
        return self.tokens.problem(result)

    # Requests

    def url(self, path: str) -> str:
        """An absolute Graph URL: a path under the account's Graph URL, or a link
        Graph gave, which must point at the same service."""
        if "://" not in path:
            return f"{self.account.graph_url.rstrip('/')}/{path.lstrip('/')}"

        link = urlsplit(path)
        if (link.scheme, link.netloc) != (self._graph.scheme, self._graph.netloc):
            raise ChannelProtocolError(
                f"Microsoft Graph gave a link to {link.scheme}://{link.netloc}, not "
                f"to {self.account.graph_url}; refusing to send the token there"
            )
        return path

    def request(
        self,
        method: str,
        path: str,
        *,
        expect: Container[int] = (200,),
        **kwargs: Any,
    ) -> requests.Response:
        """Send a request, renewing a refused token once and waiting out throttling."""
        target = self.url(path)
        headers = kwargs.pop("headers", {})
        renewed = False
        throttled = 0
        while True:
            auth = {"Authorization": f"Bearer {self.access_token()}"}
            try:
                response = self._http.request(
                    method, target, headers={**headers, **auth}, **kwargs
                )
            except requests.RequestException as exc:
                raise ChannelConnectError(
                    f"cannot reach Microsoft Graph at {self._graph.netloc}: "
                    f"{request_failure(exc)}"
                ) from exc

            status = response.status_code
            if status in expect:
                return response

            if status == 401 and not renewed:
                renewed = True
                response.close()
                self.tokens.forget_token()
                continue

            if status in (429, 503) and throttled < THROTTLE_RETRIES:
                wait = _retry_after(response, throttled)
                if wait <= self.max_throttle_wait:
                    throttled += 1
                    log.warning(
                        "Microsoft Graph is throttling; waiting before retrying",
                        status=status,
                        wait_seconds=wait,
                        attempt=throttled,
                        path=urlsplit(target).path,
                    )
                    response.close()
                    time.sleep(wait)
                    continue

            raise self.failure(method, target, response)

    def upload(self, url: str, chunk: bytes, start: int, total: int) -> None:
        """PUT one byte range to an upload session's pre-authorised URL.

        The URL carries its own authorisation, so no token goes with it.
        """
        end = start + len(chunk) - 1
        headers = {
            "Content-Range": f"bytes {start}-{end}/{total}",
            "Content-Type": "application/octet-stream",
        }
        try:
            response = self._http.request("PUT", url, data=chunk, headers=headers)
        except requests.RequestException as exc:
            raise ChannelConnectError(
                "cannot reach the upload URL Microsoft Graph gave: "
                f"{request_failure(exc)}"
            ) from exc

        if response.status_code not in (200, 201):
            raise self.failure("PUT", url, response)

    def failure(
        self, method: str, target: str, response: requests.Response
    ) -> ChannelError:
        """The error of an answer Graph gave, in words an operator can act on."""
        status = response.status_code
        code, message = _graph_error(response)
        said = f"{code}: {message}" if code else f"HTTP {status}"
        mailbox = self.account.mailbox

        if status == 401:
            return ChannelAuthError(
                f"Microsoft Graph refused the access token for {mailbox} ({said}): "
                "check that the app registration still exists and its secret is "
                "current"
            )
        if status == 403:
            kind = (
                "application"
                if self.account.auth_flow == "client_credentials"
                else "delegated"
            )
            return ChannelAuthError(
                f"Microsoft Graph denied access to {mailbox} ({said}): the app needs "
                f"the {kind} permissions Mail.ReadWrite and Mail.Send with admin "
                "consent, and an Exchange application access policy, if there is "
                "one, must include this mailbox"
            )
        if code in ("ErrorInvalidUser", "MailboxNotEnabledForRESTAPI"):
            return ChannelError(
                f"the tenant has no Exchange Online mailbox {mailbox!r} ({said}): "
                "check the mailbox address and its licence"
            )
        if status in (429, 503) or status >= 500:
            return ChannelConnectError(
                f"Microsoft Graph is busy or failing ({said}); it is tried again later"
            )
        return ChannelProtocolError(
            f"Microsoft Graph answered {method} {urlsplit(target).path} with HTTP "
            f"{status} ({said})"
        )

    def json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return _decoded(self.request(method, path, **kwargs))

    def pages(self, path: str) -> Iterator[dict[str, Any]]:
        """Every item of a collection, following ``@odata.nextLink``."""
        link: str | None = path
        while link:
            page = self.json("GET", link)
            yield from page.get("value", [])
            link = page.get("@odata.nextLink")

    def user_path(self, *parts: str) -> str:
        quoted = [quote(self.account.mailbox, safe="@")] + [
            quote(part, safe="=$") for part in parts
        ]
        return "users/" + "/".join(quoted)


def _retry_after(response: requests.Response, attempt: int) -> float:
    """Seconds Graph asked to wait; without an answer, back off exponentially."""
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return float(2**attempt)


def _decoded(response: requests.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError as exc:
        raise ChannelProtocolError(
            f"Microsoft Graph answered {urlsplit(response.url).path} with "
            "something that is not JSON"
        ) from exc
    if not isinstance(data, dict):
        raise ChannelProtocolError(
            "Microsoft Graph answered JSON that is not an object"
        )
    return data


def _graph_error(response: requests.Response) -> tuple[str, str]:
    try:
        error = response.json().get("error", {})
    except (ValueError, AttributeError):
        return "", ""
    if not isinstance(error, dict):
        return str(error), ""
    return str(error.get("code", "")), str(error.get("message", ""))


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

            page = _decoded(response)
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
