"""A real SMTP server for the tests, on a free port of 127.0.0.1.

``SmtpServer`` runs aiosmtpd on an event loop in a thread of its own. It
speaks plain SMTP, STARTTLS or implicit TLS with the test CA's certificate,
asks for AUTH (PLAIN, LOGIN) when given a username and password, or for AUTH
XOAUTH2 when given a check for bearer tokens, and keeps
every message it accepts. Failures are scripted: ``fail_next`` answers one
stage of the next transactions with a chosen reply, ``drop_next_connection``
hangs up without a reply and ``disconnect_all`` hangs up on idle clients, so a
test can meet the 421, 451, 550 and lost connections real servers give.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from shared.accounts import Security, SmtpAccount
from tests.support.tls import TestPki

HOST = "127.0.0.1"
MECHANISMS = ("PLAIN", "LOGIN")
# A check of an XOAUTH2 login: (user, token) -> accepted.
TokenCheck = Callable[[str, str], bool]

Stage = Literal["mail", "rcpt", "data"]


class Mode(StrEnum):
    PLAIN = "plain"
    STARTTLS = "starttls"
    TLS = "tls"


SECURITY = {
    Mode.PLAIN: Security.NONE,
    Mode.STARTTLS: Security.STARTTLS,
    Mode.TLS: Security.TLS,
}


@dataclass(frozen=True)
class ReceivedMessage:
    """One message the server accepted, as it came over the wire."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    connection: int
    tls: bool
    login: str | None


@dataclass(frozen=True)
class AuthAttempt:
    mechanism: str
    username: str
    accepted: bool


@dataclass
class _Script:
    """What the server does at one stage instead of accepting."""

    stage: Stage
    reply: str | None
    times: int
    address: str | None

    def matches(self, stage: Stage, address: str | None) -> bool:
        if self.stage != stage:
            return False

        return self.address is None or self.address.lower() == (address or "").lower()


class _Connection(SMTP):
    """aiosmtpd's protocol, numbered and tracked by the server that made it."""

    def __init__(self, owner: SmtpServer, **kwargs: Any) -> None:
        super().__init__(owner, **kwargs)
        self.owner = owner
        self.number = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # STARTTLS calls this a second time for the same client.
        upgrade = self._original_transport is not None
        super().connection_made(transport)

        if not upgrade:
            self.number = self.owner._opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.owner._closed(self)
        super().connection_lost(error)

    def hang_up(self) -> None:
        """Close after what has been written reaches the client."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping anything not yet written."""
        if isinstance(self.transport, asyncio.Transport):
            self.transport.abort()

    @property
    def encrypted(self) -> bool:
        transport = self.transport
        return transport is not None and bool(transport.get_extra_info("ssl_object"))


class SmtpServer:
    """An SMTP server on 127.0.0.1 that records and, when told, misbehaves."""

    def __init__(
        self,
        mode: Mode | str = Mode.PLAIN,
        *,
        pki: TestPki | None = None,
        username: str | None = None,
        password: str | None = None,
        mechanisms: Sequence[str] = MECHANISMS,
        size_limit: int | None = 64 * 1024 * 1024,
        token_check: TokenCheck | None = None,
    ) -> None:
        self.mode = Mode(mode)
        if self.mode is not Mode.PLAIN and pki is None:
            raise ValueError(f"mode {self.mode} needs the test pki for a certificate")

        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")

        self.pki = pki
        self.username = username
        self._password = password
        self._token_check = token_check
        self._excluded = [m for m in MECHANISMS if m not in mechanisms]
        if token_check is None:
            self._excluded.append("XOAUTH2")
        elif username is None:
            self._excluded += MECHANISMS
        self._size_limit = size_limit
        self.port = 0

        self._lock = threading.Condition()
        self._messages: list[ReceivedMessage] = []
        self._auth: list[AuthAttempt] = []
        self._scripts: list[_Script] = []
        self._open: set[_Connection] = set()
        self._connections = 0

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tls: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return f"SmtpServer({self.mode}, {HOST}:{self.port})"

    def __enter__(self) -> SmtpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=loop.run_forever, name=f"smtp-{self.mode}", daemon=True
        )
        thread.start()
        self._loop, self._thread = loop, thread

        tls = self._context() if self.mode is Mode.TLS else None
        listening = loop.create_server(self._connection, HOST, 0, ssl=tls)
        self._server = asyncio.run_coroutine_threadsafe(listening, loop).result(5)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        self._loop = self._thread = self._server = None

    def account(self, **overrides: Any) -> SmtpAccount:
        """An account that reaches this server, trusting the test CA."""
        settings: dict[str, Any] = {
            "host": HOST,
            "port": self.port,
            "security": SECURITY[self.mode],
            "username": self.username or "nobody",
            "ca_file": str(self.pki.ca_file) if self.pki else None,
        }
        settings.update(overrides)
        return SmtpAccount(**settings)

    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._lock:
            return list(self._messages)

    @property
    def logins(self) -> list[AuthAttempt]:
        """Every AUTH the server answered, accepted or not."""
        with self._lock:
            return list(self._auth)

    @property
    def connections(self) -> int:
        """Client connections accepted since the server started."""
        with self._lock:
            return self._connections

    def wait_for(self, count: int, timeout: float = 5.0) -> list[ReceivedMessage]:
        """The first ``count`` messages, once that many have arrived."""
        with self._lock:
            arrived = self._lock.wait_for(lambda: len(self._messages) >= count, timeout)
            if not arrived:
                raise AssertionError(
                    f"{len(self._messages)} of {count} messages arrived "
                    f"within {timeout} s"
                )

            return self._messages[:count]

    def fail_next(
        self,
        stage: Stage,
        reply: str = "451 4.3.0 try again later",
        *,
        times: int = 1,
        address: str | None = None,
    ) -> None:
        """Answer ``stage`` with ``reply`` the next ``times`` times.

        ``address`` limits it to one sender (mail) or recipient (rcpt). A 421
        reply is followed by hanging up, as real servers do.
        """
        with self._lock:
            self._scripts.append(_Script(stage, reply, times, address))

    def drop_next_connection(self, stage: Stage = "data") -> None:
        """Hang up without a reply at the next ``stage``.

        At "data" the whole message has been sent, so the client cannot know
        whether it was delivered; the server does not keep it.
        """
        with self._lock:
            self._scripts.append(_Script(stage, None, 1, None))

    def disconnect_all(self) -> None:
        """Hang up on every connected client now, as an idle timeout does."""
        if self._loop is None:
            return

        asyncio.run_coroutine_threadsafe(self._hang_up_all(), self._loop).result(5)

    def _context(self) -> ssl.SSLContext:
        if self._tls is None:
            assert self.pki is not None
            self._tls = self.pki.server_context()

        return self._tls

    def _connection(self) -> _Connection:
        return _Connection(
            self,
            hostname="localhost",
            data_size_limit=self._size_limit,
            tls_context=self._context() if self.mode is Mode.STARTTLS else None,
            require_starttls=self.mode is Mode.STARTTLS,
            # AUTH is required in handle_MAIL instead: aiosmtpd warns about
            # every plain connection that requires it.
            auth_required=False,
            # aiosmtpd only knows about TLS it started itself (STARTTLS); on an
            # implicit TLS port the whole session is already encrypted.
            auth_require_tls=self.mode is Mode.STARTTLS,
            auth_exclude_mechanism=self._excluded,
            authenticator=self._authenticate if self.username else None,
            loop=self._loop,
        )

    def _opened(self, connection: _Connection) -> int:
        with self._lock:
            self._connections += 1
            self._open.add(connection)
            return self._connections

    def _closed(self, connection: _Connection) -> None:
        with self._lock:
            self._open.discard(connection)

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        assert self.username is not None and self._password is not None

        username = auth_data.login.decode("utf-8", "replace")
        accepted = hmac.compare_digest(
            auth_data.login, self.username.encode()
        ) and hmac.compare_digest(auth_data.password, self._password.encode())
        with self._lock:
            self._auth.append(AuthAttempt(mechanism, username, accepted))

        return AuthResult(success=accepted, handled=False, auth_data=auth_data)

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        """SASL XOAUTH2 as Exchange Online and Gmail speak it.

        A refused token gets the JSON error challenge, which the client
        answers with an empty line before the final 535.
        """
        if len(args) > 1:
            initial: bytes | None = args[1].encode()
        else:
            answer = await server.challenge_auth("")
            if not isinstance(answer, bytes):
                return AuthResult(success=False, handled=True)
            initial = base64.b64encode(answer)
        try:
            fields = base64.b64decode(initial, validate=True).decode().split("\x01")
        except (binascii.Error, UnicodeDecodeError):
            return AuthResult(success=False, message="501 5.5.2 Cannot decode")

        values = dict(f.partition("=")[::2] for f in fields if f)
        user = values.get("user", "")
        token = values.get("auth", "").removeprefix("Bearer ")
        accepted = self._token_check is not None and self._token_check(user, token)
        with self._lock:
            self._auth.append(AuthAttempt("XOAUTH2", user, accepted))
        if accepted:
            return AuthResult(success=True, auth_data=LoginPassword(user.encode(), b""))

        error = {"status": "401", "schemes": "bearer", "scope": "SMTP.Send"}
        await server.challenge_auth(json.dumps(error))
        return AuthResult(success=False, handled=False)

    def _scripted(self, stage: Stage, address: str | None) -> _Script | None:
        with self._lock:
            for script in self._scripts:
                if script.matches(stage, address):
                    script.times -= 1
                    if script.times <= 0:
                        self._scripts.remove(script)
                    return script

        return None

    async def _answer(self, server: _Connection, script: _Script) -> str:
        """The scripted reply, or no reply at all when the script hangs up."""
        if script.reply is None:
            server.abort()
        elif script.reply.startswith("421"):
            await server.push(script.reply)
            server.hang_up()
        else:
            return script.reply

        # connection_lost cancels the coroutine waiting here.
        await asyncio.Event().wait()
        raise AssertionError("a hung-up connection kept running")

    async def handle_MAIL(
        self,
        server: _Connection,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        wants_auth = self.username is not None or self._token_check is not None
        if wants_auth and not session.authenticated:
            return "530 5.7.0 Authentication required"

        script = self._scripted("mail", address)
        if script is not None:
            return await self._answer(server, script)

        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: _Connection,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        script = self._scripted("rcpt", address)
        if script is not None:
            return await self._answer(server, script)

        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(
        self, server: _Connection, session: Session, envelope: Envelope
    ) -> str:
        script = self._scripted("data", None)
        if script is not None:
            return await self._answer(server, script)

        login = session.auth_data.login if session.auth_data else None
        message = ReceivedMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=bytes(envelope.original_content or b""),
            connection=server.number,
            tls=server.encrypted,
            login=login.decode("utf-8", "replace") if login else None,
        )
        with self._lock:
            self._messages.append(message)
            number = len(self._messages)
            self._lock.notify_all()

        return f"250 2.0.0 OK queued as {number}"

    async def handle_exception(self, error: Exception) -> str:
        # A client that gives up on the handshake is what the TLS tests do.
        return f"500 5.0.0 {type(error).__name__}"

    async def _hang_up_all(self) -> None:
        with self._lock:
            open_now = list(self._open)

        # abort, not close: a TLS close waits for the client's close_notify,
        # which an idle client does not send.
        for connection in open_now:
            connection.abort()

        deadline = time.monotonic() + 2
        while self._open and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._hang_up_all()
        await self._server.wait_closed()

        current = asyncio.current_task()
        for task in asyncio.all_tasks():
            if task is not current:
                task.cancel()


@pytest.fixture
def smtp_server_factory(pki: TestPki) -> Iterator[Callable[..., SmtpServer]]:
    """Starts SmtpServers with the test CA; each is stopped after the test."""
    started: list[SmtpServer] = []

    def start(mode: Mode | str = Mode.PLAIN, **options: Any) -> SmtpServer:
        options.setdefault("pki", pki)
        server = SmtpServer(mode, **options)
        server.start()
        started.append(server)
        return server

    yield start

    for server in started:
        server.stop()


@pytest.fixture
def smtp_server(
    smtp_server_factory: Callable[..., SmtpServer],
) -> SmtpServer:
    """A plain SMTP server without AUTH."""
    return smtp_server_factory(Mode.PLAIN)
