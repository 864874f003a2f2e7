"""Probes of a channel's Exchange Online mailbox through Microsoft Graph.

Inbound, the probe signs in as the poller does (client credentials, or the
stored refresh token) and reads the mailbox's Inbox folder. Outbound, it
signs in and reads the Drafts folder, where the sender writes messages too
large for one request; whether Graph lets the app send (Mail.Send) shows only
when it sends, so that is not tried.

Azure AD's refusals name the setting at fault (tenant ID, client ID, client
secret, redirect URI); Graph's 403 is a missing permission. Every connection,
to Azure AD as to Graph, is made by the validation's ``Dialer``, so the same
address rules hold for both.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from services.admin.validation_network import (
    Dialer,
    Endpoint,
    chain,
    failure,
    found,
)
from services.admin.validation_verdicts import Kind, StepFailed, Verdict
from shared.accounts import GraphAccount, MicrosoftApp, MicrosoftLogin, TokenLogin
from shared.errors import ChannelAuthError, ChannelError
from shared.graph import GraphClient
from shared.oauth import HttpSession, Scopes, TokenSource, sign_in_problem
from shared.xoauth2 import token_secret

# Throttling is waited out only this long: the validation has 60 s in all.
THROTTLE_WAIT = 5.0
FOLDERS = {"inbound": "inbox", "outbound": "drafts"}
# Settings of the app registration stored once per channel, not per direction.
SECRET_FIELDS = frozenset({"client_secret", "refresh_token"})

Dial = Callable[[str, int, float | None], socket.socket]


class _SignsIn(Protocol):
    def access_token(self) -> str: ...

    @property
    def updated_secrets(self) -> dict[str, str]: ...

    def close(self) -> None: ...


S = TypeVar("S", bound=_SignsIn)


class Credentials:
    """The channel's secrets, shared by the probes of both directions.

    Azure AD rotates a refresh token each time it is redeemed, and the old one
    may stop working; so signing in with one is done by one probe at a time,
    each with the token the one before it got.
    """

    def __init__(self, secrets: Mapping[str, str]) -> None:
        self.given = dict(secrets)
        self._current = dict(secrets)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Credentials({sorted(self._current)})"

    def get(self, name: str) -> str:
        with self._lock:
            return self._current.get(name, "")

    def rotated(self) -> dict[str, str]:
        """The secrets signing in has changed, to be stored for the next poll."""
        with self._lock:
            return {
                name: value
                for name, value in self._current.items()
                if self.given.get(name) != value
            }

    def sign_in(self, client_for: Callable[[dict[str, str]], S]) -> S:
        """A client made with the current secrets and signed in; close it."""
        with self._lock:
            client = client_for(dict(self._current))
            try:
                client.access_token()
            except BaseException:
                client.close()
                raise
            finally:
                self._current.update(client.updated_secrets)
        return client


def probe_graph(
    account: GraphAccount, direction: str, credentials: Credentials, dialer: Dialer
) -> Verdict:
    """Sign in, then read a folder of the mailbox."""
    _check_settings(account, direction, credentials)
    authority = _endpoint(account.authority_host, direction, "Azure AD")
    graph = _endpoint(account.graph_url, direction, "Microsoft Graph")

    seconds = dialer.budget.step()

    def client_for(secrets: dict[str, str]) -> GraphClient:
        client = GraphClient(
            account,
            secrets,
            timeout=seconds,
            max_throttle_wait=min(THROTTLE_WAIT, dialer.budget.remaining()),
        )
        _connect_through(client, _Adapter(dialer, [authority, graph]))
        return client

    try:
        client = credentials.sign_in(client_for)
    except ChannelAuthError as exc:
        raise _refused(exc, account, direction) from exc
    except ChannelError as exc:
        raise _unreachable(exc, authority, "signing in", seconds) from exc

    try:
        folder = _read_folder(client, FOLDERS[direction], graph, seconds)
    finally:
        client.close()

    message = (
        f"signed in to Azure AD ({account.auth_flow.replace('_', ' ')}) and read "
        f"the {folder} of {account.mailbox} through Microsoft Graph"
    )
    if direction == "outbound":
        message += "; whether Graph lets it send shows when the first reply goes"
    return Verdict.passed(message)


def _check_settings(
    account: MicrosoftApp,
    direction: str,
    credentials: Credentials,
    kind: Kind = Kind.GRAPH_TOKEN_ERROR,
) -> None:
    """What can be seen to be wrong before anything goes over the network."""
    padded = {
        f"{direction}.tenant_id": ("tenant ID", account.tenant_id),
        f"{direction}.client_id": ("client ID", account.client_id),
        "client_secret": ("client secret", credentials.get("client_secret")),
    }
    for field, (name, value) in padded.items():
        if value != value.strip():
            raise StepFailed(
                Kind.BAD_SETTING,
                f"the {name} has white space at its start or end; paste it again "
                "without it",
                field,
            )

    if not credentials.get("client_secret"):
        raise StepFailed(
            Kind.BAD_SETTING,
            "no client secret is stored for this channel: enter the secret's "
            "Value from Certificates & secrets in the app registration",
            "client_secret",
        )
    if account.auth_flow == "authorization_code" and not credentials.get(
        "refresh_token"
    ):
        raise StepFailed(
            kind,
            "this channel has not been authorised yet: use Save and authorise to "
            "sign in to the mailbox",
            "refresh_token",
        )

    settings = ["authority_host"]
    if isinstance(account, GraphAccount):
        settings.append("graph_url")
    for setting in settings:
        url = urlsplit(getattr(account, setting))
        if url.scheme != "https" or not url.hostname:
            raise StepFailed(
                Kind.BAD_SETTING,
                f"the {setting} {getattr(account, setting)!r} is not an https:// "
                "URL; secrets and tokens travel only encrypted",
                f"{direction}.{setting}",
            )


def mail_token(
    login: MicrosoftLogin | TokenLogin,
    direction: str,
    scopes: Scopes,
    credentials: Credentials,
    dialer: Dialer,
) -> str:
    """The access token an IMAP or SMTP probe logs in with (XOAUTH2)."""
    if isinstance(login, TokenLogin):
        name = token_secret(direction)
        token = credentials.get(name)
        if not token:
            raise StepFailed(
                Kind.BAD_SETTING,
                f"the {direction} account signs in with an access token, but none "
                f"is stored: set the secret {name}",
                name,
            )
        return token

    _check_settings(login, direction, credentials, Kind.TOKEN_ERROR)
    authority = _endpoint(login.authority_host, direction, "Azure AD")
    seconds = dialer.budget.step()

    def source_for(secrets: dict[str, str]) -> TokenSource:
        http = HttpSession(seconds, login.ca_file or True)
        _route_through(http.session, _Adapter(dialer, [authority]))
        return TokenSource(login, secrets, scopes, http=http)

    try:
        source = credentials.sign_in(source_for)
    except ChannelAuthError as exc:
        raise _refused(exc, login, direction, Kind.TOKEN_ERROR) from exc
    except ChannelError as exc:
        raise _unreachable(exc, authority, "signing in", seconds) from exc
    token = source.access_token()
    source.close()
    return token


def _endpoint(url: str, direction: str, protocol: str) -> Endpoint:
    parts = urlsplit(url)
    setting = "authority_host" if protocol == "Azure AD" else "graph_url"
    return Endpoint(
        direction, protocol, parts.hostname or "", parts.port or 443, setting
    )


def _read_folder(
    client: GraphClient, name: str, graph: Endpoint, seconds: float
) -> str:
    path = client.user_path("mailFolders", name)
    try:
        response = client.request("GET", path, expect=(200, 401, 403, 404))
    except ChannelError as exc:
        raise _unreachable(exc, graph, f"reading folder {name}", seconds) from exc

    if response.status_code == 200:
        folder = _decoded(response)
        return (
            f"{folder.get('displayName') or name} folder "
            f"({folder.get('totalItemCount', 0)} message(s))"
        )

    said = str(client.failure("GET", client.url(path), response))
    if response.status_code == 403:
        raise StepFailed(Kind.GRAPH_PERMISSION_MISSING, said)
    if response.status_code == 401:
        raise StepFailed(Kind.GRAPH_TOKEN_ERROR, said)
    raise StepFailed(Kind.BAD_SETTING, said, f"{graph.direction}.mailbox")


def _refused(
    exc: ChannelAuthError,
    account: MicrosoftApp,
    direction: str,
    kind: Kind = Kind.GRAPH_TOKEN_ERROR,
) -> StepFailed:
    """Azure AD's refusal, with the setting to change."""
    said = " ".join(str(item) for item in chain(exc))
    problem = sign_in_problem(account, "", said, padded_secret=False)
    if problem.field == "consent":
        missing = (
            Kind.GRAPH_PERMISSION_MISSING if kind is Kind.GRAPH_TOKEN_ERROR else kind
        )
        return StepFailed(missing, str(exc))

    field = None
    if problem.field in SECRET_FIELDS:
        field = problem.field
    elif problem.field:
        field = f"{direction}.{problem.field}"
    return StepFailed(kind, str(exc), field)


def _unreachable(
    exc: ChannelError, endpoint: Endpoint, doing: str, seconds: float
) -> StepFailed:
    """A failure to talk to Azure AD or Graph at all, or an answer out of place."""
    if found(exc, requests.Timeout) is not None:
        return failure(TimeoutError(), endpoint, doing, seconds)
    if found(exc, requests.RequestException) is not None:
        return failure(exc, endpoint, doing, seconds)
    return StepFailed(Kind.PROTOCOL_ERROR, str(exc))


def _decoded(response: requests.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _connect_through(client: GraphClient, adapter: HTTPAdapter) -> None:
    # GraphClient has no hook for its transport; this session carries msal's
    # requests and Graph's.
    _route_through(client._http.session, adapter)


def _route_through(session: requests.Session, adapter: HTTPAdapter) -> None:
    # Proxies from the environment are not used: through a proxy the address
    # rules could not hold.
    session.trust_env = False
    session.mount("https://", adapter)
    session.mount("http://", adapter)


class _Adapter(HTTPAdapter):
    """requests' adapter, its connections made by the Dialer."""

    def __init__(self, dialer: Dialer, endpoints: list[Endpoint]) -> None:
        self._dialer = dialer
        # Where Azure AD and Graph share an address, signing in comes first
        # and names the authority.
        self._endpoints: dict[tuple[str, int], Endpoint] = {}
        for endpoint in endpoints:
            self._endpoints.setdefault((endpoint.host, endpoint.port), endpoint)
        self._direction = endpoints[0].direction
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _pools(self._dial)

    def _dial(self, host: str, port: int, timeout: float | None) -> socket.socket:
        endpoint = self._endpoints.get((host, port)) or Endpoint(
            self._direction, "HTTPS", host, port, "authority_host"
        )
        return self._dialer.connect(endpoint, timeout)


def _pools(dial: Dial) -> dict[str, type[HTTPConnectionPool]]:
    """urllib3's pools, with connections that ``dial`` makes."""

    class Plain(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            return _dialed(self, dial)

    class Tls(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            return _dialed(self, dial)

    class PlainPool(HTTPConnectionPool):
        ConnectionCls = Plain

    class TlsPool(HTTPSConnectionPool):
        ConnectionCls = Tls

    return {"http": PlainPool, "https": TlsPool}


def _dialed(connection: HTTPConnection, dial: Dial) -> socket.socket:
    timeout = connection.timeout
    sock = dial(
        connection.host,
        int(connection.port or 443),
        timeout if isinstance(timeout, int | float) else None,
    )
    for option in connection.socket_options or ():
        sock.setsockopt(*option)
    return sock
