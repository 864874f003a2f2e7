"""Signing in to Microsoft's identity platform, and OAuth bearer tokens for mail.

``TokenSource`` gets access tokens with msal for one app registration, as the
app itself (client credentials) or as the person who authorised the channel
once (a refresh token, rotated on each use). Microsoft Graph uses it, and so
do IMAP and SMTP accounts that sign in with XOAUTH2 (``shared.xoauth2``).

Whatever Azure AD refuses becomes a ``ChannelAuthError`` in plain words,
naming the setting to change (``sign_in_problem``).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import msal
import requests

from shared.accounts import MicrosoftApp
from shared.errors import ChannelAuthError, ChannelConnectError

GRAPH = "https://graph.microsoft.com/"
OUTLOOK = "https://outlook.office.com/"
# Exchange Online's IMAP, POP and SMTP take app-only tokens of this resource.
OUTLOOK_APP = "https://outlook.office365.com/.default"


@dataclass(frozen=True)
class Scopes:
    """What to ask Azure AD for: as the app, and as a signed-in person."""

    app: tuple[str, ...]
    delegated: tuple[str, ...]
    permissions: str  # as the Azure portal's API permissions page names them


# The .Shared permissions cover the signed-in person's own mailbox and the
# shared mailboxes they may open, which is what contact centres use.
GRAPH_SCOPES = Scopes(
    (f"{GRAPH}.default",),
    (f"{GRAPH}Mail.ReadWrite.Shared", f"{GRAPH}Mail.Send.Shared"),
    "Mail.ReadWrite and Mail.Send (Microsoft Graph)",
)
IMAP_SCOPES = Scopes(
    (OUTLOOK_APP,),
    (f"{OUTLOOK}IMAP.AccessAsUser.All",),
    "IMAP.AccessAsUser.All (delegated) or IMAP.AccessAsApp (Office 365 Exchange "
    "Online)",
)
POP3_SCOPES = Scopes(
    (OUTLOOK_APP,),
    (f"{OUTLOOK}POP.AccessAsUser.All",),
    "POP.AccessAsUser.All (delegated) or POP.AccessAsApp (Office 365 Exchange Online)",
)
SMTP_SCOPES = Scopes(
    (OUTLOOK_APP,),
    (f"{OUTLOOK}SMTP.Send",),
    "SMTP.Send (delegated) or SMTP.SendAsApp (Office 365 Exchange Online)",
)

TOKEN_EARLY_SECONDS = 60.0
AADSTS = re.compile(r"AADSTS(\d+)")


@dataclass(frozen=True)
class SignInProblem:
    """Why Azure AD refused a sign-in, and the setting to change."""

    field: str
    text: str


def sign_in_problem(
    account: MicrosoftApp,
    error: str,
    description: str,
    *,
    padded_secret: bool,
    permissions: str = GRAPH_SCOPES.permissions,
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
            f"permissions {registration} grant admin consent for {permissions}, "
            "then authorise the channel again",
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


class HttpSession:
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


def request_failure(exc: requests.RequestException) -> str:
    """Why an HTTPS request failed, in words that say what to check."""
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


@contextmanager
def signing_in(account: MicrosoftApp) -> Iterator[None]:
    """Turn what msal and requests raise while signing in into ChannelErrors."""
    where = account.authority_host
    try:
        yield
    except requests.RequestException as exc:
        raise ChannelConnectError(
            f"cannot reach Azure AD at {where}: {request_failure(exc)}"
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


class TokenSource:
    """Access tokens for one Microsoft app registration; safe to share by threads.

    A token is reused until a minute before it expires. With the
    authorization-code flow each renewal rotates the refresh token:
    ``updated_secrets`` holds the one to store.
    """

    def __init__(
        self,
        account: MicrosoftApp,
        secrets: Mapping[str, str],
        scopes: Scopes,
        *,
        http: HttpSession,
    ) -> None:
        self.account = account
        self.scopes = scopes
        self._secrets = dict(secrets)
        self._http = http
        self._app: Any = None
        self._token: str | None = None
        self._token_until = 0.0
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return (
            f"TokenSource(tenant={self.account.tenant_id!r}, "
            f"client={self.account.client_id!r}, flow={self.account.auth_flow})"
        )

    @property
    def updated_secrets(self) -> dict[str, str]:
        with self._lock:
            return dict(self._secrets)

    def application(self) -> Any:
        """The msal application; creating it reads the tenant's metadata."""
        with self._lock:
            if self._app is None:
                self._app = self._new_application()
            return self._app

    def _new_application(self) -> Any:
        secret = self._secrets.get("client_secret", "")
        if not secret:
            raise ChannelAuthError(
                "no client secret is stored for this channel: enter the secret of "
                "the app registration in the channel's settings"
            )
        authority = (
            f"{self.account.authority_host.rstrip('/')}/{self.account.tenant_id}"
        )
        with signing_in(self.account):
            return msal.ConfidentialClientApplication(
                self.account.client_id,
                client_credential=secret,
                authority=authority,
                validate_authority=False,
                instance_discovery=False,
                http_client=self._http,
            )

    def access_token(self) -> str:
        with self._lock:
            if self._token is not None and time.monotonic() < self._token_until:
                return self._token

            if self.account.auth_flow == "client_credentials":
                scopes = list(self.scopes.app)
                result = self._acquire(
                    lambda app: app.acquire_token_for_client(scopes=scopes)
                )
            else:
                refresh_token = self._secrets.get("refresh_token")
                if not refresh_token:
                    raise ChannelAuthError(
                        "this channel has not been authorised yet: use Save and "
                        "authorise to sign in to the mailbox"
                    )
                scopes = list(self.scopes.delegated)
                result = self._acquire(
                    lambda app: app.acquire_token_by_refresh_token(
                        refresh_token, scopes=scopes
                    )
                )
            self.keep(result)
            return str(result["access_token"])

    def keep(self, result: Mapping[str, Any]) -> None:
        """Remember a token response, and the refresh token it rotated."""
        with self._lock:
            lifetime = float(result.get("expires_in", 0))
            self._token = str(result["access_token"])
            self._token_until = time.monotonic() + lifetime - TOKEN_EARLY_SECONDS
            if result.get("refresh_token"):
                self._secrets["refresh_token"] = str(result["refresh_token"])

    def close(self) -> None:
        self._http.close()

    def forget_token(self) -> None:
        """Drop the cached token, after a server refused it."""
        with self._lock:
            self._token = None
            if self._app is not None and self.account.auth_flow == "client_credentials":
                self._app.remove_tokens_for_client()

    def problem(self, result: Mapping[str, Any]) -> SignInProblem:
        secret = self._secrets.get("client_secret", "")
        return sign_in_problem(
            self.account,
            str(result.get("error", "")),
            str(result.get("error_description", "")),
            padded_secret=secret != secret.strip(),
            permissions=self.scopes.permissions,
        )

    def _acquire(self, call: Callable[[Any], Mapping[str, Any]]) -> Mapping[str, Any]:
        app = self.application()
        with signing_in(self.account):
            result: Mapping[str, Any] = call(app)
        if "access_token" not in result:
            raise ChannelAuthError(self.problem(result).text)
        return result
