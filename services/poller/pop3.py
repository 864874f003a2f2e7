"""A POP3 mailbox: list by UIDL, retrieve, and delete only what was published.

POP3 commits deletions when the client says QUIT. Leaving the ``with`` block
normally says QUIT; leaving it by an exception closes the connection without
it, so the server keeps every message and the next poll sees them again.
"""

from __future__ import annotations

import poplib
import ssl
from types import TracebackType

from services.poller.fetched import Fetched
from services.poller.imap import connect_failure, tls_context
from shared.accounts import Pop3Account, Security
from shared.errors import ChannelAuthError, ChannelConnectError, ChannelProtocolError
from shared.models import MailSource, Protocol
from shared.xoauth2 import (
    Bearer,
    log_in_renewing,
    pop3_offers_xoauth2,
    pop3_xoauth2,
)

# poplib refuses lines over 2048 bytes, yet real mail has longer lines (HTML
# without line breaks); a line is allowed up to this many bytes instead.
MAX_LINE_BYTES = 1 << 20


class _Plain(poplib.POP3):
    """poplib's client, with room for the long lines real mail has."""

    def _getline(self) -> tuple[bytes, int]:
        line = self.file.readline(MAX_LINE_BYTES + 1)
        if len(line) > MAX_LINE_BYTES:
            raise poplib.error_proto("line too long")
        if not line:
            raise poplib.error_proto("-ERR EOF")

        octets = len(line)
        if line[-2:] == b"\r\n":
            return line[:-2], octets
        if line[:1] == b"\r":
            return line[1:-1], octets
        return line[:-1], octets


class _Tls(_Plain, poplib.POP3_SSL):
    pass


class Pop3Mailbox:
    """One logged-in POP3 session; use it as a context manager."""

    def __init__(
        self, account: Pop3Account, credential: str | Bearer, *, timeout: float
    ):
        """``credential`` is the password, or the bearer of an XOAUTH2 login."""
        self.account = account
        self.timeout = timeout
        self._credential = credential
        self._session: poplib.POP3 | None = None
        self._where = f"POP3 server {account.host}:{account.port}"

    def __repr__(self) -> str:
        return f"Pop3Mailbox({self.account.username!r} at {self._where})"

    def __enter__(self) -> Pop3Mailbox:
        session = self._connect()
        try:
            self._log_in(session)
        except BaseException:
            _close(session)
            raise

        self._session = session
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        session, self._session = self._session, None
        if session is None:
            return

        if exc_type is not None:
            # Without QUIT the server forgets this session's deletions.
            _close(session)
            return

        try:
            session.quit()
        except (poplib.error_proto, OSError) as error:
            _close(session)
            raise ChannelConnectError(
                f"{self._where} did not confirm QUIT ({error}); the deletions "
                "of this poll may not have been made and are repeated next poll"
            ) from error

    def listing(self) -> list[tuple[int, str, int]]:
        """Every message as (message number, UIDL, size in bytes)."""
        session = self._connected()
        try:
            _, sizes_lines, _ = session.list()
            _, uidl_lines, _ = session.uidl()
        except poplib.error_proto as exc:
            raise ChannelProtocolError(
                f"{self._where} refused to list the messages ({_reply(exc)}); "
                "UIDL is required to poll a POP3 mailbox"
            ) from exc
        except OSError as exc:
            raise self._lost("listing the messages", exc) from exc

        sizes = dict(_pairs(sizes_lines, self._where))
        uidls = dict(_pairs(uidl_lines, self._where))
        if not all(size.isdigit() for size in sizes.values()):
            raise ChannelProtocolError(
                f"{self._where} listed a message size that is not a number"
            )

        # A message deleted by another session between the commands is gone.
        return [
            (number, uidl, int(sizes[number]))
            for number, uidl in sorted(uidls.items())
            if number in sizes
        ]

    def retrieve(self, number: int, uidl: str, size: int, *, max_bytes: int) -> Fetched:
        """The message, or only its size when it is larger than ``max_bytes``."""
        source = MailSource(protocol=Protocol.POP3, uidl=uidl)
        if size > max_bytes:
            return Fetched(source=source, data=None, size=size)

        session = self._connected()
        try:
            _, lines, _ = session.retr(number)
        except poplib.error_proto as exc:
            raise ChannelProtocolError(
                f"{self._where} refused to send message {number} ({_reply(exc)})"
            ) from exc
        except OSError as exc:
            raise self._lost(f"retrieving message {number}", exc) from exc

        data = b"\r\n".join(lines) + b"\r\n"
        return Fetched(source=source, data=data, size=size)

    def delete(self, number: int) -> None:
        """Mark a message deleted; the server removes it at QUIT."""
        session = self._connected()
        try:
            session.dele(number)
        except poplib.error_proto as exc:
            raise ChannelProtocolError(
                f"{self._where} refused to delete message {number} ({_reply(exc)})"
            ) from exc
        except OSError as exc:
            raise self._lost(f"deleting message {number}", exc) from exc

    def _connect(self) -> poplib.POP3:
        account = self.account
        context = tls_context(account.verify_tls, account.ca_file, self._where)

        session: poplib.POP3
        try:
            if account.security is Security.TLS:
                session = _Tls(
                    account.host, account.port, timeout=self.timeout, context=context
                )
            else:
                session = _Plain(account.host, account.port, timeout=self.timeout)
        except poplib.error_proto as exc:
            raise ChannelProtocolError(
                f"{self._where} did not greet like a POP3 server ({_reply(exc)}); "
                "check the port"
            ) from exc
        except OSError as exc:
            raise connect_failure(exc, self._where, self.timeout) from exc

        if account.security is Security.STARTTLS:
            self._start_tls(session, context)
        return session

    def _start_tls(self, session: poplib.POP3, context: ssl.SSLContext) -> None:
        try:
            session.stls(context)
        except poplib.error_proto as exc:
            _close(session)
            if "not supported" in str(exc):
                raise ChannelConnectError(
                    f"{self._where} does not offer STLS (STARTTLS); use security "
                    "'tls' with its implicit TLS port (usually 995)"
                ) from exc
            raise ChannelConnectError(
                f"{self._where} refused STARTTLS ({_reply(exc)})"
            ) from exc
        except OSError as exc:
            _close(session)
            raise connect_failure(exc, self._where, self.timeout) from exc

    def _log_in(self, session: poplib.POP3) -> None:
        if not isinstance(self._credential, str):
            self._log_in_with_token(session, self._credential)
            return
        try:
            session.user(self.account.username)
            session.pass_(self._credential)
        except poplib.error_proto as exc:
            raise ChannelAuthError(
                f"{self._where} refused the login of {self.account.username!r} "
                f"({_reply(exc)}); check the user name and password, and that "
                "the mailbox allows POP3 with a password"
            ) from exc
        except OSError as exc:
            raise self._lost("logging in", exc) from exc

    def _log_in_with_token(self, session: poplib.POP3, bearer: Bearer) -> None:
        """AUTH XOAUTH2; a refused token is renewed and tried once more."""
        username = self.account.username
        try:
            if not pop3_offers_xoauth2(session):
                raise ChannelAuthError(
                    f"{self._where} does not offer SASL XOAUTH2 on this "
                    "connection; sign in with a password instead, or check the "
                    "security setting: many servers offer it only over TLS"
                )
            log_in_renewing(
                bearer,
                lambda token: pop3_xoauth2(session, username, token),
                poplib.error_proto,
            )
        except poplib.error_proto as exc:
            raise ChannelAuthError(
                f"{self._where} refused the OAuth token for {username!r} "
                f"({_reply(exc)}); check that the user name is the mailbox the "
                "token is for, that the app has the POP permission, and that the "
                "mailbox allows POP3"
            ) from exc
        except OSError as exc:
            raise self._lost("logging in", exc) from exc

    def _connected(self) -> poplib.POP3:
        if self._session is None:
            raise RuntimeError("use the mailbox inside a with block")
        return self._session

    def _lost(self, doing: str, exc: OSError) -> ChannelConnectError:
        if isinstance(exc, TimeoutError):
            return ChannelConnectError(
                f"{self._where} did not answer within {self.timeout:g} s "
                f"while {doing}; the poll is retried"
            )
        return ChannelConnectError(
            f"connection to {self._where} was lost while {doing} "
            f"({type(exc).__name__}: {exc}); the poll is retried"
        )


def _pairs(lines: list[bytes], where: str) -> list[tuple[int, str]]:
    """``b"<number> <value>"`` lines of LIST and UIDL as pairs."""
    pairs = []
    for line in lines:
        number, _, value = line.decode("ascii", "replace").partition(" ")
        if not number.isdigit() or not value.strip():
            raise ChannelProtocolError(
                f"{where} sent a listing line POP3 does not allow: {line[:80]!r}"
            )
        pairs.append((int(number), value.strip()))
    return pairs


def _reply(exc: poplib.error_proto) -> str:
    """The server's words from a poplib error."""
    reply = exc.args[0] if exc.args else ""
    if isinstance(reply, bytes):
        reply = reply.decode("utf-8", "replace")
    return str(reply).strip()[:300]


def _close(session: poplib.POP3) -> None:
    """Drop the connection without QUIT, whatever state it is in."""
    try:
        session.close()
    except OSError:
        # A failed TLS handshake leaves poplib a socket that is closed already.
        return
