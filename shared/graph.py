"""Signed-in requests to Microsoft Graph, for the poller, the sender and Validate.

``GraphClient`` gets its tokens from ``shared.oauth`` and sends Graph
requests: a refused token is renewed once, throttling (429, 503) is waited
out within a bound, and every failure becomes a ``ChannelError`` whose text
says what to change.
"""

from __future__ import annotations

import time
from collections.abc import Container, Iterator, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from shared.accounts import GraphAccount
from shared.errors import (
    ChannelAuthError,
    ChannelConnectError,
    ChannelError,
    ChannelProtocolError,
)
from shared.logs import get_logger
from shared.oauth import (
    GRAPH_SCOPES,
    HttpSession,
    SignInProblem,
    TokenSource,
    request_failure,
)

log = get_logger(__name__)

THROTTLE_RETRIES = 4


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
        return decoded_json(self.request(method, path, **kwargs))

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


def decoded_json(response: requests.Response) -> dict[str, Any]:
    """The JSON object Graph answered; anything else is a protocol error."""
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
