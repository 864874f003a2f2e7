"""The probe of a channel's inbound POP3 mailbox.

It goes as far as a poll does before it reads any mail: connect with TLS as
configured, log in, STAT, and UIDL of at most one message, which polling
needs. Nothing is retrieved or deleted, so QUIT commits nothing.

poplib does the talking on a socket from the validation's ``Dialer``.
"""

from __future__ import annotations

import poplib
import socket
import ssl
from typing import Any

from services.admin.validation_network import (
    SECURED,
    Dialer,
    Endpoint,
    client_tls,
    failure,
    next_step,
    require_password,
    server_words,
)
from services.admin.validation_verdicts import Kind, StepFailed, Verdict
from shared.accounts import Pop3Account, Security
from shared.xoauth2 import pop3_offers_xoauth2, pop3_xoauth2


class _Pop3(poplib.POP3):
    """poplib's session, on a socket from the Dialer."""

    def __init__(
        self,
        dialer: Dialer,
        endpoint: Endpoint,
        context: ssl.SSLContext | None,
        timeout: float,
    ) -> None:
        self._dialer = dialer
        self._endpoint = endpoint
        self._context = context
        try:
            super().__init__(endpoint.host, endpoint.port, timeout)
        except BaseException:
            # poplib keeps the socket of a failed greeting open.
            if getattr(self, "sock", None) is not None:
                self.sock.close()
            raise

    def _create_socket(self, timeout: Any) -> socket.socket:
        sock = self._dialer.connect(self._endpoint)
        if self._context is None:
            return sock

        try:
            return self._context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def probe_pop3(
    account: Pop3Account, password: str, dialer: Dialer, *, token: str | None = None
) -> Verdict:
    """Connect, log in, and check STAT and UIDL, which polling needs.

    With ``token`` the login is XOAUTH2 with that access token.
    """
    endpoint = Endpoint("inbound", "POP3", account.host, account.port)
    context = client_tls(account.verify_tls, account.ca_file, endpoint)
    if token is None:
        require_password(password, endpoint)

    seconds = dialer.budget.step()
    implicit = context if account.security is Security.TLS else None
    try:
        session = _Pop3(dialer, endpoint, implicit, seconds)
    except poplib.error_proto as exc:
        raise StepFailed(
            Kind.PROTOCOL_ERROR,
            f"{endpoint} did not greet like a POP3 server ({server_words(exc)}); check "
            "that the port is the server's POP3 port (usually 995, or 110)",
            endpoint.field("port"),
        ) from exc
    except OSError as exc:
        raise failure(exc, endpoint, "connecting", seconds) from exc

    try:
        if account.security is Security.STARTTLS:
            _pop3_stls(session, context, endpoint, dialer)
        if token is None:
            _pop3_login(session, account.username, password, endpoint, dialer)
        else:
            _pop3_token_login(session, account.username, token, endpoint, dialer)
        count = _pop3_listing(session, endpoint, dialer)
    except BaseException:
        # Without QUIT nothing is committed, and nothing waits once more.
        _pop3_shut(session)
        raise

    _pop3_quit(session, dialer)

    return Verdict.passed(
        f"logged in to {endpoint} as {account.username!r} "
        f"{SECURED[account.security]}; the mailbox holds {count} message(s)"
    )


def _pop3_stls(
    session: poplib.POP3, context: ssl.SSLContext, endpoint: Endpoint, dialer: Dialer
) -> None:
    seconds = next_step(session.sock, dialer)
    try:
        session.stls(context)
    except poplib.error_proto as exc:
        offered = "not supported" not in str(exc)
        raise StepFailed(
            Kind.TLS_FAILURE,
            f"{endpoint} {'refused' if offered else 'does not offer'} STLS "
            f"(STARTTLS) ({server_words(exc)}); use security 'tls' with its implicit "
            "TLS port (usually 995)",
            endpoint.field("security"),
        ) from exc
    except OSError as exc:
        raise failure(exc, endpoint, "starting TLS", seconds) from exc


def _pop3_login(
    session: poplib.POP3,
    username: str,
    password: str,
    endpoint: Endpoint,
    dialer: Dialer,
) -> None:
    seconds = next_step(session.sock, dialer)
    try:
        session.user(username)
        session.pass_(password)
    except poplib.error_proto as exc:
        raise StepFailed(
            Kind.AUTH_FAILURE,
            f"{endpoint} refused the login for {username!r} ({server_words(exc)}); "
            "check the channel's inbound username and password, and that the "
            "mailbox allows POP3 with a password",
            endpoint.field("password"),
        ) from exc
    except OSError as exc:
        raise failure(exc, endpoint, "logging in", seconds) from exc


def _pop3_token_login(
    session: poplib.POP3,
    username: str,
    token: str,
    endpoint: Endpoint,
    dialer: Dialer,
) -> None:
    seconds = next_step(session.sock, dialer)
    try:
        offered = pop3_offers_xoauth2(session)
        if offered:
            pop3_xoauth2(session, username, token)
    except poplib.error_proto as exc:
        raise StepFailed(
            Kind.AUTH_FAILURE,
            f"{endpoint} refused the OAuth token for {username!r} "
            f"({server_words(exc)}); check that the username is the mailbox the "
            "token is for, that the app has the POP permission, and that the "
            "mailbox allows POP3",
            endpoint.field("oauth2"),
        ) from exc
    except OSError as exc:
        raise failure(exc, endpoint, "logging in", seconds) from exc
    if not offered:
        raise StepFailed(
            Kind.AUTH_FAILURE,
            f"{endpoint} does not offer SASL XOAUTH2 on this connection; many "
            "servers offer it only over TLS: check the security setting, or sign "
            "in with a password",
            endpoint.field("security"),
        )


def _pop3_listing(session: poplib.POP3, endpoint: Endpoint, dialer: Dialer) -> int:
    """The number of messages, once UIDL is known to work."""
    seconds = next_step(session.sock, dialer)
    try:
        count, _size = session.stat()
        # UIDL of one message is enough to know the server has it, and
        # costs little in a large mailbox.
        if count:
            session.uidl(1)
        else:
            session.uidl()
    except poplib.error_proto as exc:
        raise StepFailed(
            Kind.PROTOCOL_ERROR,
            f"{endpoint} refused STAT or UIDL ({server_words(exc)}); polling a POP3 "
            "mailbox needs UIDL to know which messages it has read, so use IMAP "
            "if the server offers it",
        ) from exc
    except OSError as exc:
        raise failure(exc, endpoint, "listing the messages", seconds) from exc

    return int(count)


def _pop3_quit(session: poplib.POP3, dialer: Dialer) -> None:
    # Nothing was marked deleted, so QUIT commits nothing; a failed QUIT
    # after every step succeeded changes no verdict.
    try:
        next_step(session.sock, dialer)
        session.quit()
    except (poplib.error_proto, OSError, StepFailed):
        _pop3_shut(session)


def _pop3_shut(session: poplib.POP3) -> None:
    try:
        session.close()
    except OSError:
        return
