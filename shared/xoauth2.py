"""Bearers of XOAUTH2 logins to IMAP and SMTP servers.

A bearer hands out a current access token: a ``shared.oauth.TokenSource``
that signs in to Microsoft, or a ``StoredToken`` that another system keeps
in one of the channel's secrets. ``Bearers`` keeps one per channel and
direction between polls and sends.
"""

from __future__ import annotations

import base64
import poplib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from shared.accounts import MicrosoftLogin, TokenLogin
from shared.errors import ChannelAuthError
from shared.oauth import HttpSession, Scopes, TokenSource

# The secrets a Microsoft login reads, shared with Graph accounts.
MICROSOFT_SECRETS = ("client_secret", "refresh_token")


class Bearer(Protocol):
    """Something that hands out a current OAuth access token."""

    def access_token(self) -> str: ...

    def forget_token(self) -> None: ...

    @property
    def updated_secrets(self) -> dict[str, str]: ...


class StoredToken:
    """An access token kept in one of the channel's secrets by another system."""

    def __init__(self, secrets: Mapping[str, str], key: str) -> None:
        self._secrets = dict(secrets)
        self._key = key

    def __repr__(self) -> str:
        return f"StoredToken({self._key})"

    @property
    def updated_secrets(self) -> dict[str, str]:
        return dict(self._secrets)

    def access_token(self) -> str:
        token = self._secrets.get(self._key, "")
        if not token:
            raise ChannelAuthError(
                f"no access token is stored for this account: set the secret "
                f"{self._key}, or sign in with Microsoft instead"
            )
        return token

    def forget_token(self) -> None:
        """A stored token cannot be renewed here; the next one comes through the API."""


def token_secret(direction: str) -> str:
    """The secret that holds an inbound or outbound account's own access token."""
    return f"{direction}_access_token"


def bearer_for(
    login: MicrosoftLogin | TokenLogin,
    secrets: Mapping[str, str],
    *,
    direction: str,
    scopes: Scopes,
    timeout: float,
) -> Bearer:
    """The token source an XOAUTH2 login needs."""
    if isinstance(login, TokenLogin):
        return StoredToken(secrets, token_secret(direction))
    return TokenSource(
        login, secrets, scopes, http=HttpSession(timeout, login.ca_file or True)
    )


def secrets_used(login: MicrosoftLogin | TokenLogin, direction: str) -> tuple[str, ...]:
    """The channel secrets a login reads; a change to one calls for a new bearer."""
    if isinstance(login, TokenLogin):
        return (token_secret(direction),)
    return MICROSOFT_SECRETS


def xoauth2(username: str, token: str) -> bytes:
    """The SASL XOAUTH2 initial response, before base64."""
    return f"user={username}\x01auth=Bearer {token}\x01\x01".encode()


def xoauth2_b64(username: str, token: str) -> str:
    return base64.b64encode(xoauth2(username, token)).decode("ascii")


class Bearers:
    """The XOAUTH2 bearers of one worker's channels, reused between polls.

    A bearer is kept while its login settings stay the same and the stored
    secrets it reads are the ones it holds; a secret changed elsewhere (a
    new sign-in, a token rotated by another worker) gives a fresh bearer.
    """

    def __init__(self, *, timeout: float) -> None:
        self._timeout = timeout
        self._kept: dict[tuple[int, str], tuple[object, Bearer]] = {}

    def __repr__(self) -> str:
        return f"Bearers({len(self._kept)} kept)"

    def get(
        self,
        channel_id: int,
        direction: str,
        login: MicrosoftLogin | TokenLogin,
        scopes: Scopes,
        secrets: Mapping[str, str],
    ) -> Bearer:
        used = secrets_used(login, direction)
        kept = self._kept.get((channel_id, direction))
        if kept is not None:
            settings, bearer = kept
            held = bearer.updated_secrets
            if settings == login and all(held.get(k) == secrets.get(k) for k in used):
                return bearer

        bearer = bearer_for(
            login, secrets, direction=direction, scopes=scopes, timeout=self._timeout
        )
        self._kept[(channel_id, direction)] = (login, bearer)
        return bearer

    def forget(self, channel_id: int) -> None:
        for direction in ("inbound", "outbound"):
            self._kept.pop((channel_id, direction), None)


def log_in_renewing(
    bearer: Bearer,
    log_in: Callable[[str], None],
    refused: type[Exception],
) -> None:
    """Log in with the bearer's token; when the server refuses it (``refused``
    is raised), renew the token and try once more. A token that renewing does
    not change, such as a stored one, is not sent twice."""
    token = bearer.access_token()
    try:
        log_in(token)
    except refused:
        bearer.forget_token()
        renewed = bearer.access_token()
        if renewed == token:
            raise
        log_in(renewed)


def pop3_xoauth2(session: poplib.POP3, username: str, token: str) -> None:
    """AUTH XOAUTH2 on a POP3 session (SASL as RFC 5034 adds it).

    poplib has no AUTH command, and its one-line replies would take a
    ``+ `` challenge for ``+OK``; so the exchange is written out here. A
    refused token comes back as a challenge holding the error, which ``*``
    cancels; poplib.error_proto is raised with the server's last reply.
    """
    # poplib's own line reader and writer, which its typing stubs leave out.
    lines: Any = session
    lines._putcmd(f"AUTH XOAUTH2 {xoauth2_b64(username, token)}")
    reply = lines._getline()[0]
    if reply == b"+" or reply.startswith(b"+ "):
        lines._putcmd("*")
        reply = lines._getline()[0]
    if not reply.startswith(b"+OK"):
        raise poplib.error_proto(reply)


def pop3_offers_xoauth2(session: poplib.POP3) -> bool:
    try:
        mechanisms = session.capa().get("SASL", [])
    except poplib.error_proto:
        return False
    return "XOAUTH2" in (m.upper() for m in mechanisms)
