"""Exchange Online through Microsoft Graph: signing in, requests, and the mailbox.

``GraphClient`` signs in with msal, as the app itself (client credentials) or
as a person who authorised the channel once (a refresh token, rotated on each
use), and sends Graph requests: a refused token is renewed once, throttling
(429, 503) is waited out within a bound, and every failure becomes a
``ChannelError`` whose text says what to change. The sender and the admin's
"save and authorise" use the same client.

``GraphMailbox`` reads one mailbox with delta queries: each page of new mail
comes with the link to store once the page is published, so a crash repeats a
page and loses none. Processed mail is marked read or moved to a folder.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Container, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import msal
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

log = get_logger(__name__)

GRAPH = "https://graph.microsoft.com/"
APP_SCOPES = [f"{GRAPH}.default"]
# The .Shared permissions cover the signed-in person's own mailbox and the
# shared mailboxes they may open, which is what contact centres use.
DELEGATED_SCOPES = [f"{GRAPH}Mail.ReadWrite.Shared", f"{GRAPH}Mail.Send.Shared"]

THROTTLE_RETRIES = 4
TOKEN_EARLY_SECONDS = 60.0
DELTA_PAGE_SIZE = 50
CHUNK_BYTES = 64 * 1024
# Folders of mail the mailbox's owner wrote or threw away; their sub-folders
# are left out with them.
NOT_CUSTOMER_MAIL = ("sentitems", "drafts", "deleteditems", "outbox")
WELL_KNOWN = frozenset(
    {"archive", "inbox", "junkemail", "deleteditems", "clutter", "conversationhistory"}
)
AADSTS = re.compile(r"AADSTS(\d+)")


@dataclass(frozen=True)
class SignInProblem:
    """Why Azure AD refused a sign-in, and the setting to change."""

    field: str
    text: str


def sign_in_problem(
    account: GraphAccount, error: str, description: str, *, padded_secret: bool
) -> SignInProblem:
    """Plain words for an Azure AD error, from its AADSTS code."""
    found = AADSTS.search(description)
    code = found.group(1) if found else ""
    tag = f"(AADSTS{code})" if code else f"({error})"
    registration = "in the app registration in the Azure portal"

    if code == "90002":
        return SignInProblem(
            "tenant_id",
            f"Azure AD has no tenant {account.tenant_id!r} {tag}: copy the "
            f"Directory (tenant) ID from the Overview page {registration}",
        )
    if code == "900023":
        return SignInProblem(
            "tenant_id",
            f"{account.tenant_id!r} is not a tenant ID or domain {tag}: copy the "
            f"Directory (tenant) ID from the Overview page {registration}",
        )
    if code == "700016":
        return SignInProblem(
            "client_id",
            f"tenant {account.tenant_id!r} has no application with client ID "
            f"{account.client_id!r} {tag}: copy the Application (client) ID from "
            f"the Overview page {registration}, and check the app is registered "
            "in this tenant",
        )
    if code == "7000215":
        blank = (
            " and without the white space at its start or end" if padded_secret else ""
        )
        return SignInProblem(
            "client_secret",
            f"the client secret is wrong {tag}: paste the secret's Value, not its "
            f"Secret ID, from Certificates & secrets {registration}{blank}",
        )
    if code == "7000222":
        return SignInProblem(
            "client_secret",
            f"the client secret has expired {tag}: add a new one under "
            f"Certificates & secrets {registration} and save it here",
        )
    if code == "7000218":
        return SignInProblem(
            "client_secret", f"no client secret was sent {tag}: enter the secret"
        )
    if code == "50011":
        return SignInProblem(
            "redirect_uri",
            f"the redirect URI {account.redirect_uri!r} is not registered for this "
            f"app {tag}: add it exactly as written here under Authentication, "
            f"platform Web, Redirect URIs {registration}, or correct it here",
        )
    if code in ("65001", "65004"):
        return SignInProblem(
            "consent",
            f"the app has not been granted its permissions {tag}: under API "
            f"permissions {registration} grant admin consent for Mail.ReadWrite "
            "and Mail.Send, then authorise the channel again",
        )
    if code in ("70008", "700082", "700084", "50173", "54005", "70000", "50076"):
        return SignInProblem(
            "refresh_token",
            f"the sign-in stored for this channel has expired or was revoked {tag}: "
            "use Save and authorise to sign in again",
        )
    if code == "53003":
        return SignInProblem(
            "consent",
            f"a Conditional Access policy blocked the sign-in {tag}: ask the "
            "tenant's administrator to allow this app",
        )

    first_line = description.splitlines()[0] if description else error
    return SignInProblem("", f"Azure AD refused the sign-in: {first_line}")


class _Http:
    """requests with the account's timeout and trusted CAs on every call.

    msal sends its requests through it too. ``verify`` goes with each request
    because requests prefers REQUESTS_CA_BUNDLE from the environment over a
    session's own setting.
    """

    def __init__(self, timeout: float, verify: str | bool) -> None:
        self.session = requests.Session()
        self.timeout = timeout
        self.verify = verify

    def request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        kwargs.setdefault("verify", self.verify)
        return self.session.request(method, url, **kwargs)

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", url, **kwargs)

    def close(self) -> None:
        self.session.close()


@contextmanager
def _signing_in(account: GraphAccount) -> Iterator[None]:
    """Turn what msal and requests raise while signing in into ChannelErrors."""
    where = account.authority_host
    try:
        yield
    except requests.RequestException as exc:
        raise ChannelConnectError(
            f"cannot reach Azure AD at {where}: {_reason(exc)}"
        ) from exc
    except msal.exceptions.MsalServiceError as exc:
        raise ChannelConnectError(
            f"Azure AD at {where} failed ({exc}); signing in is tried again later"
        ) from exc
    except ValueError as exc:
        # msal reports a failed tenant discovery as a ValueError raised while
        # handling another whose text holds Azure AD's answer.
        said = f"{exc} {exc.__context__ or ''}"
        if AADSTS.search(said):
            problem = sign_in_problem(account, "", said, padded_secret=False)
            raise ChannelAuthError(problem.text) from exc
        raise ChannelAuthError(
            f"{where} did not answer as Azure AD for tenant "
            f"{account.tenant_id!r}: check the authority host and tenant ID"
        ) from exc


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
        self._secrets = dict(secrets)
        self._http = _Http(timeout, account.ca_file or True)
        self._app: Any = None
        self._token: str | None = None
        self._token_until = 0.0
        self._graph = urlsplit(account.graph_url)

    def __repr__(self) -> str:
        return (
            f"GraphClient({self.account.mailbox!r}, tenant={self.account.tenant_id!r}, "
            f"flow={self.account.auth_flow})"
        )

    @property
    def updated_secrets(self) -> dict[str, str]:
        """The secrets to store: the refresh token rotates with each renewal."""
        return dict(self._secrets)

    def close(self) -> None:
        self._http.close()

    # Signing in

    def application(self) -> Any:
        """The msal application; creating it reads the tenant's metadata."""
        if self._app is not None:
            return self._app

        secret = self._secrets.get("client_secret", "")
        if not secret:
            raise ChannelAuthError(
                "no client secret is stored for this channel: enter the secret of "
                "the app registration in the channel's settings"
            )

        authority = (
            f"{self.account.authority_host.rstrip('/')}/{self.account.tenant_id}"
        )
        with _signing_in(self.account):
            self._app = msal.ConfidentialClientApplication(
                self.account.client_id,
                client_credential=secret,
                authority=authority,
                validate_authority=False,
                instance_discovery=False,
                http_client=self._http,
            )
        return self._app

    def access_token(self) -> str:
        if self._token is not None and time.monotonic() < self._token_until:
            return self._token

        if self.account.auth_flow == "client_credentials":
            result = self._acquire(
                lambda app: app.acquire_token_for_client(scopes=APP_SCOPES)
            )
        else:
            refresh_token = self._secrets.get("refresh_token")
            if not refresh_token:
                raise ChannelAuthError(
                    "this channel has not been authorised yet: use Save and "
                    "authorise to sign in to the mailbox"
                )
            result = self._acquire(
                lambda app: app.acquire_token_by_refresh_token(
                    refresh_token, scopes=DELEGATED_SCOPES
                )
            )

        self.keep(result)
        log.debug("signed in to Azure AD", flow=self.account.auth_flow)
        return str(result["access_token"])

    def keep(self, result: Mapping[str, Any]) -> None:
        """Remember a token response, and the refresh token it rotated."""
        lifetime = float(result.get("expires_in", 0))
        self._token = str(result["access_token"])
        self._token_until = time.monotonic() + lifetime - TOKEN_EARLY_SECONDS
        if result.get("refresh_token"):
            self._secrets["refresh_token"] = str(result["refresh_token"])

    def _acquire(self, call: Callable[[Any], Mapping[str, Any]]) -> Mapping[str, Any]:
        app = self.application()

        with _signing_in(self.account):
            result: Mapping[str, Any] = call(app)

        if "access_token" not in result:
            raise ChannelAuthError(self.problem(result).text)
        return result

    def problem(self, result: Mapping[str, Any]) -> SignInProblem:
        secret = self._secrets.get("client_secret", "")
        return sign_in_problem(
            self.account,
            str(result.get("error", "")),
            str(result.get("error_description", "")),
            padded_secret=secret != secret.strip(),
        )

    def _forget_token(self) -> None:
        self._token = None
        if self._app is not None and self.account.auth_flow == "client_credentials":
            self._app.remove_tokens_for_client()

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
                    f"{_reason(exc)}"
                ) from exc

            status = response.status_code
            if status in expect:
                return response

            if status == 401 and not renewed:
                renewed = True
                response.close()
                self._forget_token()
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
                f"cannot reach the upload URL Microsoft Graph gave: {_reason(exc)}"
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


def _reason(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.exceptions.SSLError):
        return (
            "its TLS certificate is not trusted; if it comes from a private CA, "
            "set the account's CA file"
        )
    if isinstance(exc, requests.exceptions.Timeout):
        return "it did not answer in time"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "the connection failed; check the host name and the network"
    return type(exc).__name__


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
                    f"lost Microsoft Graph while downloading a message: {_reason(exc)}"
                ) from exc

        return Fetched(source, bytes(data), len(data))
