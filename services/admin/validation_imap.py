"""The probe of a channel's inbound IMAP mailbox.

It goes as far as a poll does before it reads any mail: connect with TLS as
configured, log in, and open the polled folder read-only (or list the folders
when every folder is polled). Nothing is fetched, flagged or moved.

IMAPClient does the talking, as in the poller, on a socket from the
validation's ``Dialer``.
"""

from __future__ import annotations

import imaplib
import socket
import ssl

from imapclient import IMAPClient
from imapclient.exceptions import CapabilityError, LoginError

from services.admin.validation_network import (
    SECURED,
    Dialer,
    Endpoint,
    broke_off,
    client_tls,
    failure,
    next_step,
    require_password,
    server_words,
)
from services.admin.validation_verdicts import Kind, StepFailed, Verdict
from shared.accounts import ImapAccount, Security


class _ImapSocket(imaplib.IMAP4):
    """imaplib's connection, on a socket from the Dialer."""

    def __init__(
        self, dialer: Dialer, endpoint: Endpoint, context: ssl.SSLContext | None
    ) -> None:
        self._dialer = dialer
        self._endpoint = endpoint
        self._context = context
        super().__init__(endpoint.host, endpoint.port)

    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        sock = self._dialer.connect(self._endpoint)
        if self._context is None:
            return sock

        try:
            return self._context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


class _Imap(IMAPClient):
    """IMAPClient, connecting through the Dialer."""

    def __init__(
        self,
        dialer: Dialer,
        endpoint: Endpoint,
        context: ssl.SSLContext,
        *,
        implicit: bool,
        timeout: float,
    ) -> None:
        self._dialer = dialer
        self._endpoint = endpoint
        super().__init__(
            endpoint.host,
            endpoint.port,
            ssl=implicit,
            ssl_context=context,
            timeout=timeout,
        )

    def _create_IMAP4(self) -> imaplib.IMAP4:
        context = self.ssl_context if self.ssl else None
        return _ImapSocket(self._dialer, self._endpoint, context)


def probe_imap(
    account: ImapAccount,
    password: str,
    dialer: Dialer,
    *,
    all_folders: bool,
    token: str | None = None,
) -> Verdict:
    """Connect, log in and open the folder the poller reads.

    With ``token`` the login is XOAUTH2 with that access token.
    """
    endpoint = Endpoint("inbound", "IMAP", account.host, account.port)
    context = client_tls(account.verify_tls, account.ca_file, endpoint)
    if token is None:
        require_password(password, endpoint)

    seconds = dialer.budget.step()
    try:
        client = _Imap(
            dialer,
            endpoint,
            context,
            implicit=account.security is Security.TLS,
            timeout=seconds,
        )
    except IMAPClient.Error as exc:
        raise StepFailed(
            Kind.PROTOCOL_ERROR,
            f"{endpoint} did not greet like an IMAP server "
            f"({server_words(exc)}); check that the port is the server's IMAP "
            "port (usually 993, or 143)",
            endpoint.field("port"),
        ) from exc
    except OSError as exc:
        raise failure(exc, endpoint, "connecting", seconds) from exc

    try:
        if account.security is Security.STARTTLS:
            _imap_starttls(client, context, endpoint, dialer)
        if token is None:
            _imap_login(client, account.username, password, endpoint, dialer)
        else:
            _imap_token_login(client, account.username, token, endpoint, dialer)
        if all_folders:
            found = _imap_folders(client, endpoint, dialer)
        else:
            found = _imap_folder(client, account.folder, endpoint, dialer)
    except BaseException:
        # Saying LOGOUT to a server that failed a step could wait once more.
        _imap_shut(client)
        raise

    _imap_logout(client, dialer)

    return Verdict.passed(
        f"logged in to {endpoint} as {account.username!r} "
        f"{SECURED[account.security]} and {found}"
    )


def _imap_starttls(
    client: IMAPClient, context: ssl.SSLContext, endpoint: Endpoint, dialer: Dialer
) -> None:
    seconds = next_step(client.socket(), dialer)
    try:
        client.starttls(context)
    except CapabilityError as exc:
        raise StepFailed(
            Kind.TLS_FAILURE,
            f"{endpoint} does not offer STARTTLS; use security 'tls' with its "
            "implicit TLS port (usually 993)",
            endpoint.field("security"),
        ) from exc
    except IMAPClient.Error as exc:
        raise StepFailed(
            Kind.TLS_FAILURE,
            f"{endpoint} refused STARTTLS ({server_words(exc)}); use security 'tls' "
            "with its implicit TLS port (usually 993)",
            endpoint.field("security"),
        ) from exc
    except OSError as exc:
        raise failure(exc, endpoint, "starting TLS", seconds) from exc


def _imap_login(
    client: IMAPClient, username: str, password: str, endpoint: Endpoint, dialer: Dialer
) -> None:
    seconds = next_step(client.socket(), dialer)
    try:
        client.login(username, password)
    except LoginError as exc:
        raise StepFailed(
            Kind.AUTH_FAILURE,
            f"{endpoint} refused the login for {username!r} ({server_words(exc)}); "
            "check the channel's inbound username and password, and that the "
            "mailbox allows IMAP with a password",
            endpoint.field("password"),
        ) from exc
    except IMAPClient.Error as exc:
        raise broke_off(endpoint, "logging in", exc) from exc
    except OSError as exc:
        raise failure(exc, endpoint, "logging in", seconds) from exc


def _imap_token_login(
    client: IMAPClient, username: str, token: str, endpoint: Endpoint, dialer: Dialer
) -> None:
    seconds = next_step(client.socket(), dialer)
    try:
        offered = client.has_capability("AUTH=XOAUTH2")
    except IMAPClient.Error as exc:
        raise broke_off(endpoint, "asking for its capabilities", exc) from exc
    except OSError as exc:
        raise failure(exc, endpoint, "asking for its capabilities", seconds) from exc
    if not offered:
        raise StepFailed(
            Kind.AUTH_FAILURE,
            f"{endpoint} does not offer AUTHENTICATE XOAUTH2 on this connection; "
            "many servers offer it only over TLS: check the security setting, or "
            "sign in with a password",
            endpoint.field("security"),
        )
    try:
        client.oauth2_login(username, token)
    except LoginError as exc:
        raise StepFailed(
            Kind.AUTH_FAILURE,
            f"{endpoint} refused the OAuth token for {username!r} "
            f"({server_words(exc)}); check that the username is the mailbox the "
            "token is for, that the app has the IMAP permission, and that the "
            "mailbox allows IMAP",
            endpoint.field("oauth2"),
        ) from exc
    except IMAPClient.Error as exc:
        raise broke_off(endpoint, "logging in", exc) from exc
    except OSError as exc:
        raise failure(exc, endpoint, "logging in", seconds) from exc


def _imap_folder(
    client: IMAPClient, folder: str, endpoint: Endpoint, dialer: Dialer
) -> str:
    seconds = next_step(client.socket(), dialer)
    try:
        status = client.select_folder(folder, readonly=True)
    except IMAPClient.AbortError as exc:
        raise broke_off(endpoint, f"opening folder {folder!r}", exc) from exc
    except IMAPClient.Error as exc:
        raise StepFailed(
            Kind.FOLDER_MISSING,
            f"{endpoint} has no folder {folder!r} the channel's user can open "
            f"({server_words(exc)}); create it, or correct the channel's inbound "
            "folder, written with the server's separator, e.g. INBOX/Orders",
            endpoint.field("folder"),
        ) from exc
    except OSError as exc:
        raise failure(exc, endpoint, f"opening folder {folder!r}", seconds) from exc

    if b"UIDVALIDITY" not in status:
        raise StepFailed(
            Kind.PROTOCOL_ERROR,
            f"{endpoint} opened folder {folder!r} without a UIDVALIDITY, so it "
            "cannot be polled by UID; use POP3 if the server offers it",
        )
    return f"opened folder {folder!r} ({status.get(b'EXISTS', 0)} message(s))"


def _imap_folders(client: IMAPClient, endpoint: Endpoint, dialer: Dialer) -> str:
    seconds = next_step(client.socket(), dialer)
    try:
        listing = client.list_folders()
    except IMAPClient.AbortError as exc:
        raise broke_off(endpoint, "listing the folders", exc) from exc
    except IMAPClient.Error as exc:
        raise StepFailed(
            Kind.PROTOCOL_ERROR,
            f"{endpoint} refused to list the folders ({server_words(exc)}), which "
            "polling every folder needs; poll one folder instead",
        ) from exc
    except OSError as exc:
        raise failure(exc, endpoint, "listing the folders", seconds) from exc

    return f"listed {len(listing)} folder(s) to poll"


def _imap_logout(client: IMAPClient, dialer: Dialer) -> None:
    # Every step succeeded; a failed LOGOUT changes no verdict.
    try:
        next_step(client.socket(), dialer)
        client.logout()
    except (IMAPClient.Error, OSError, StepFailed):
        _imap_shut(client)


def _imap_shut(client: IMAPClient) -> None:
    try:
        client.shutdown()
    except OSError:
        return
