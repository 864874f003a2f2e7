"""The probe of a channel's outbound SMTP server.

It goes as far as the sender does before a message: connect, EHLO, STARTTLS
or implicit TLS as configured, and AUTH when a password is stored. It never
says MAIL FROM, so nothing can be sent. smtplib's client does the talking,
on a socket from the validation's ``Dialer``.
"""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
from collections.abc import Callable
from typing import TypeVar

from services.admin.validation_network import (
    SECURED,
    Dialer,
    Endpoint,
    client_tls,
    failure,
)
from services.admin.validation_verdicts import Kind, StepFailed, Verdict
from shared.accounts import Security, SmtpAccount
from shared.xoauth2 import xoauth2_b64

T = TypeVar("T")
# Replies that mean the server wants encryption before AUTH.
NEEDS_TLS = frozenset({530, 538})


class _Smtp(smtplib.SMTP):
    """smtplib's client, on a socket from the Dialer."""

    def __init__(
        self,
        dialer: Dialer,
        endpoint: Endpoint,
        context: ssl.SSLContext | None,
        timeout: float,
    ) -> None:
        self._dialer = dialer
        self._endpoint = endpoint
        self._implicit = context
        # Replaced by the address literal of the connection once it is made:
        # working out this host's own name could ask the DNS resolver.
        super().__init__(local_hostname="[127.0.0.1]", timeout=timeout)
        # STARTTLS checks the certificate against this name; smtplib sets it
        # only when the constructor connects.
        self._host = endpoint.host

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = self._dialer.connect(self._endpoint)
        local = sock.getsockname()[0]
        self.local_hostname = f"[IPv6:{local}]" if ":" in local else f"[{local}]"
        if self._implicit is None:
            return sock

        try:
            return self._implicit.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise


def probe_smtp(
    account: SmtpAccount,
    password: str | None,
    dialer: Dialer,
    *,
    token: str | None = None,
) -> Verdict:
    """Connect, EHLO, secure and log in as the sender would; send nothing.

    With ``token`` the login is XOAUTH2 with that access token.
    """
    endpoint = Endpoint("outbound", "SMTP", account.host, account.port)
    context = client_tls(account.verify_tls, account.ca_file, endpoint)

    seconds = dialer.budget.step()
    implicit = context if account.security is Security.TLS else None
    smtp = _Smtp(dialer, endpoint, implicit, seconds)
    try:
        _greeting(smtp, endpoint, seconds)
        _step(smtp, endpoint, dialer, "EHLO", smtp.ehlo_or_helo_if_needed)
        if account.security is Security.STARTTLS:
            _starttls(smtp, context, endpoint, dialer)
        if token is None:
            logged_in = _log_in(smtp, account.username, password, endpoint, dialer)
        else:
            logged_in = _token_log_in(smtp, account.username, token, endpoint, dialer)
    except BaseException:
        # QUIT to a server that failed a step could wait once more.
        smtp.close()
        raise

    _quit(smtp, dialer)
    login = (
        f"accepted the login of {account.username!r}"
        if logged_in
        else "was not asked to log in, as no outbound password is stored"
    )
    return Verdict.passed(
        f"{endpoint} answered EHLO {SECURED[account.security]} and {login}; "
        "nothing was sent"
    )


def _greeting(smtp: smtplib.SMTP, endpoint: Endpoint, seconds: float) -> None:
    try:
        code, text = smtp.connect(endpoint.host, endpoint.port)
    except smtplib.SMTPServerDisconnected as exc:
        if isinstance(exc.__context__, TimeoutError):
            waiting = "waiting for the greeting"
            raise failure(exc.__context__, endpoint, waiting, seconds) from exc
        raise StepFailed(
            Kind.PROTOCOL_ERROR,
            f"{endpoint} closed the connection without a greeting; check that the "
            "port is the server's SMTP port and that security matches it: 'tls' "
            "for 465, 'starttls' for 587 and 25",
            endpoint.field("port"),
        ) from exc
    except OSError as exc:
        raise failure(exc, endpoint, "connecting", seconds) from exc

    if code != 220:
        raise StepFailed(
            Kind.PROTOCOL_ERROR,
            f"{endpoint} greeted with {code} {_text(text)} instead of 220; check "
            "that the port is the server's SMTP port and that it accepts this "
            "client",
            endpoint.field("port"),
        )


def _starttls(
    smtp: smtplib.SMTP, context: ssl.SSLContext, endpoint: Endpoint, dialer: Dialer
) -> None:
    if not smtp.has_extn("starttls"):
        raise StepFailed(
            Kind.TLS_FAILURE,
            f"{endpoint} does not offer STARTTLS; use security 'tls' with its "
            "implicit TLS port (usually 465), or check the port",
            endpoint.field("security"),
        )

    def secure() -> None:
        smtp.starttls(context=context)
        smtp.ehlo()

    _step(smtp, endpoint, dialer, "STARTTLS", secure)


def _log_in(
    smtp: smtplib.SMTP,
    username: str,
    password: str | None,
    endpoint: Endpoint,
    dialer: Dialer,
) -> bool:
    """AUTH as the sender does it, PLAIN or else LOGIN; False without a password."""
    if password is None:
        return False

    offered = smtp.esmtp_features.get("auth", "").upper().split()
    if "PLAIN" not in offered and "LOGIN" not in offered:
        raise StepFailed(
            Kind.AUTH_FAILURE,
            f"{endpoint} offers no AUTH mechanism Mailroom speaks (PLAIN, LOGIN) "
            f"on this connection; offered: {' '.join(offered) or 'none'}. Many "
            "servers offer AUTH only after STARTTLS: check the security setting",
            endpoint.field("security"),
        )

    def authenticate() -> tuple[int, bytes]:
        if "PLAIN" in offered:
            secret = _b64(f"\0{username}\0{password}")
            return smtp.docmd("AUTH", f"PLAIN {secret}")

        code, text = smtp.docmd("AUTH", "LOGIN")
        if code == 334:
            code, text = smtp.docmd(_b64(username))
        if code == 334:
            code, text = smtp.docmd(_b64(password))
        return code, text

    code, text = _step(smtp, endpoint, dialer, "AUTH", authenticate)
    if code == 235:
        return True

    if code in NEEDS_TLS:
        raise StepFailed(
            Kind.BAD_SETTING,
            f"{endpoint} wants encryption before AUTH ({code} {_text(text)}); set "
            "the channel's outbound security to 'starttls' or 'tls'",
            endpoint.field("security"),
        )
    raise StepFailed(
        Kind.AUTH_FAILURE,
        f"{endpoint} refused the login for {username!r} ({code} {_text(text)}); "
        "check the channel's outbound username and password",
        endpoint.field("password"),
    )


def _token_log_in(
    smtp: smtplib.SMTP, username: str, token: str, endpoint: Endpoint, dialer: Dialer
) -> bool:
    """AUTH XOAUTH2 as the sender does it."""
    offered = smtp.esmtp_features.get("auth", "").upper().split()
    if "XOAUTH2" not in offered:
        raise StepFailed(
            Kind.AUTH_FAILURE,
            f"{endpoint} does not offer AUTH XOAUTH2 on this connection (offered: "
            f"{' '.join(offered) or 'none'}); many servers offer AUTH only after "
            "STARTTLS: check the security setting, or sign in with a password",
            endpoint.field("security"),
        )

    def authenticate() -> tuple[int, bytes]:
        code, text = smtp.docmd("AUTH", f"XOAUTH2 {xoauth2_b64(username, token)}")
        if code == 334:
            # The challenge is the error as JSON; an empty line ends it.
            code, text = smtp.docmd("")
        return code, text

    code, text = _step(smtp, endpoint, dialer, "AUTH", authenticate)
    if code == 235:
        return True
    raise StepFailed(
        Kind.AUTH_FAILURE,
        f"{endpoint} refused the OAuth token for {username!r} ({code} "
        f"{_text(text)}); check that the username is the mailbox the token is "
        "for and that the app has the SMTP permission",
        endpoint.field("oauth2"),
    )


def _step(
    smtp: smtplib.SMTP,
    endpoint: Endpoint,
    dialer: Dialer,
    stage: str,
    call: Callable[[], T],
) -> T:
    """Run one SMTP exchange with its own timeout, its failure as a verdict."""
    seconds = dialer.budget.step()
    if smtp.sock is not None:
        smtp.sock.settimeout(seconds)

    try:
        return call()
    except smtplib.SMTPResponseException as exc:
        raise StepFailed(
            Kind.PROTOCOL_ERROR,
            f"{endpoint} answered {exc.smtp_code} {_text(exc.smtp_error)} to "
            f"{stage}; check the host, port and security setting",
        ) from exc
    except smtplib.SMTPServerDisconnected as exc:
        if isinstance(exc.__context__, OSError):
            raise failure(exc.__context__, endpoint, stage, seconds) from exc
        raise StepFailed(
            Kind.PROTOCOL_ERROR,
            f"{endpoint} closed the connection during {stage}; check the port and "
            "security setting",
        ) from exc
    except OSError as exc:
        raise failure(exc, endpoint, stage, seconds) from exc


def _quit(smtp: smtplib.SMTP, dialer: Dialer) -> None:
    # Every step succeeded; a failed QUIT changes no verdict.
    try:
        if smtp.sock is not None:
            smtp.sock.settimeout(dialer.budget.step())
        smtp.quit()
    except (OSError, StepFailed):
        smtp.close()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def _text(reply: bytes | str) -> str:
    if isinstance(reply, bytes):
        reply = reply.decode("utf-8", "replace")
    return " ".join(reply.split())[:300]
