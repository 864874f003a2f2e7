"""Delivery of composed messages to a channel's SMTP server.

One ``SmtpConnection`` keeps one connection open across sends. Servers hang
up on idle clients, so a connection that turns out to be gone when the next
MAIL FROM is sent is opened again, once: nothing of that message had been
sent yet. Every failure becomes a ``TemporaryDeliveryError`` (worth retrying:
4xx replies, timeouts, lost connections) or a ``PermanentDeliveryError``
(5xx replies, refused certificates and credentials), with the server's reply
code where there is one. The password never appears in an error or a log.
"""

from __future__ import annotations

import base64
import re
import smtplib
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType

from shared.accounts import Security, SmtpAccount
from shared.errors import (
    ChannelConnectError,
    ChannelError,
    DeliveryError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
)
from shared.logs import get_logger
from shared.xoauth2 import Bearer, xoauth2_b64

log = get_logger(__name__)

TLS_CLOSED = (ssl.SSLEOFError, ssl.SSLZeroReturnError)
# What a stale connection looks like when the next command is sent on it.
GONE = (smtplib.SMTPServerDisconnected, ConnectionError, *TLS_CLOSED)
# Where a TLS failure means settings that will never work, not a bad moment.
HANDSHAKES = frozenset({"connect", "STARTTLS"})
ENVELOPE_ADDRESS = re.compile(r"^[!-;=?-~]+@[!-;=?-~]+$")
CREDENTIALS = "check the channel's SMTP username and password"
# DATA sends the message in pieces of about this many bytes (1 MiB).
DATA_PIECE = 1 << 20
LINE_END = re.compile(rb"\r\n|\r(?!\n)|\n")
LEADING_DOT = re.compile(rb"(?m)^\.")


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"

    @classmethod
    def of(cls, code: int, text: bytes | str) -> Reply:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")

        return cls(code, " ".join(text.split()))


@dataclass(frozen=True)
class SendResult:
    """What the server said about one message."""

    accepted: list[str]
    refused: dict[str, Reply]
    reply: Reply

    def summary(self) -> str:
        """One line for a delivery status: the final reply and who got it."""
        text = f"{self.reply}; {len(self.accepted)} recipient(s) accepted"
        if self.refused:
            text += "; refused " + ", ".join(
                f"{recipient} ({reply})" for recipient, reply in self.refused.items()
            )

        return text


class SmtpConnection:
    """A reusable connection to one channel's SMTP server."""

    def __init__(
        self,
        account: SmtpAccount,
        credential: str | Bearer | None,
        *,
        timeout: float,
        local_hostname: str | None = None,
    ) -> None:
        self._account = account
        self._credential = credential
        self._timeout = timeout
        self._local_hostname = local_hostname
        self._smtp: smtplib.SMTP | None = None
        self._where = f"SMTP server {account.host}:{account.port}"

    def __repr__(self) -> str:
        state = "open" if self._smtp else "closed"
        return f"SmtpConnection({self._where}, {self._account.security}, {state})"

    def __enter__(self) -> SmtpConnection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def send(self, sender: str, recipients: list[str], message: bytes) -> SendResult:
        """Deliver ``message``; returns once the server has taken it.

        Recipients the server refuses while accepting others are listed in
        ``SendResult.refused``; when it refuses them all, nothing is sent.
        """
        if not recipients:
            raise PermanentDeliveryError("the message has no recipients")

        # An empty sender is the null reverse-path, <>.
        for address in [sender, *recipients] if sender else recipients:
            _check_envelope_address(address)

        smtp, replies = self._mail_from(sender, recipients, len(message))
        try:
            accepted, refused = self._rcpt_to(smtp, recipients, replies)
            reply = self._data(smtp, message)
        except DeliveryError:
            self._reset()
            raise
        except BaseException:
            # Stopped halfway through a transaction: the state is unknown.
            self._discard()
            raise

        return SendResult(accepted, refused, reply)

    def close(self) -> None:
        """Say QUIT and close; the next send opens a new connection."""
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return

        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            # The server may already have gone; the socket is closed either way.
            smtp.close()

    def _mail_from(
        self, sender: str, recipients: list[str], size: int
    ) -> tuple[smtplib.SMTP, list[Reply] | None]:
        """MAIL FROM, on the open connection or, if it has gone, a new one.

        Where the server offers PIPELINING the RCPT TOs go in the same write
        and their replies are returned; otherwise they are still to be sent.
        """
        if self._smtp is not None:
            smtp = self._smtp
            with self._translated("MAIL FROM"):
                try:
                    reply, replies = self._envelope(smtp, sender, recipients, size)
                except GONE:
                    reply, replies = Reply(421, "connection lost while idle"), None

            if reply.code != 421:
                self._check(reply, "MAIL FROM")
                return smtp, replies

            log.info("smtp_reconnect", server=self._where, reply=str(reply))
            self._discard()

        smtp = self._connect()
        with self._translated("MAIL FROM"):
            reply, replies = self._envelope(smtp, sender, recipients, size)

        self._check(reply, "MAIL FROM")
        return smtp, replies

    def _envelope(
        self, smtp: smtplib.SMTP, sender: str, recipients: list[str], size: int
    ) -> tuple[Reply, list[Reply] | None]:
        options = self._mail_options(smtp, size)
        if not smtp.has_extn("pipelining"):
            return Reply.of(*smtp.mail(sender, options)), None

        # One write and one round trip instead of one per command (RFC 2920).
        extra = "".join(f" {option}" for option in options)
        commands = [f"MAIL FROM:{smtplib.quoteaddr(sender)}{extra}\r\n"]
        commands += [f"RCPT TO:{smtplib.quoteaddr(to)}\r\n" for to in recipients]
        smtp.send("".join(commands))

        reply = Reply.of(*smtp.getreply())
        if reply.code == 421:
            # The server closes the connection; no more replies will come.
            return reply, None

        return reply, [Reply.of(*smtp.getreply()) for _ in recipients]

    def _rcpt_to(
        self,
        smtp: smtplib.SMTP,
        recipients: list[str],
        replies: list[Reply] | None,
    ) -> tuple[list[str], dict[str, Reply]]:
        accepted: list[str] = []
        refused: dict[str, Reply] = {}
        for index, recipient in enumerate(recipients):
            if replies is not None:
                reply = replies[index]
            else:
                with self._translated("RCPT TO"):
                    reply = Reply.of(*smtp.rcpt(recipient))

            if reply.code == 421:
                self._check(reply, "RCPT TO")

            if reply.code in (250, 251):
                accepted.append(recipient)
            else:
                refused[recipient] = reply

        if not accepted:
            replies = list(refused.values())
            first = next((r for r in replies if r.code < 500), replies[0])
            error = (
                TemporaryDeliveryError if first.code < 500 else PermanentDeliveryError
            )
            raise error(
                f"{self._where} refused every recipient: "
                + "; ".join(f"{to}: {reply}" for to, reply in refused.items()),
                first.code,
            )

        return accepted, refused

    def _data(self, smtp: smtplib.SMTP, message: bytes) -> Reply:
        # smtplib's data() would make whole copies of the message on the way.
        with self._translated("DATA"):
            reply = Reply.of(*smtp.docmd("DATA"))

        self._check(reply, "DATA")
        if reply.code != 354:
            raise TemporaryDeliveryError(
                f"{self._where} answered {reply} to DATA, not 354", reply.code
            )

        with self._translated("DATA"):
            for piece in _data_pieces(message):
                smtp.send(piece)

            reply = Reply.of(*smtp.getreply())

        self._check(reply, "DATA")
        return reply

    def _check(self, reply: Reply, stage: str) -> None:
        if 200 <= reply.code < 400:
            return

        if reply.code == 421:
            # The server closes the connection after a 421.
            self._discard()

        error = TemporaryDeliveryError if reply.code < 500 else PermanentDeliveryError
        raise error(f"{self._where} answered {reply} to {stage}", reply.code)

    def _connect(self) -> smtplib.SMTP:
        security = self._account.security
        host, port = self._account.host, self._account.port
        context = self._tls_context() if security is not Security.NONE else None

        with self._translated("connect"):
            if security is Security.TLS:
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                    host,
                    port,
                    local_hostname=self._local_hostname,
                    timeout=self._timeout,
                    context=context,
                )
            else:
                smtp = smtplib.SMTP(
                    host,
                    port,
                    local_hostname=self._local_hostname,
                    timeout=self._timeout,
                )

        # From here on the socket is ours to close if anything fails.
        self._smtp = smtp
        with self._translated("EHLO"):
            smtp.ehlo_or_helo_if_needed()

        if security is Security.STARTTLS:
            self._starttls(smtp, context)

        if isinstance(self._credential, str):
            self._login(smtp, self._credential)
        elif self._credential is not None:
            self._login_with_token(smtp, self._credential)

        log.debug("smtp_connected", server=self._where, security=str(security))
        return smtp

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self._account.ca_file:
            try:
                context.load_verify_locations(cafile=self._account.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise PermanentDeliveryError(
                    f"the CA file {self._account.ca_file} of {self._where} cannot "
                    f"be read ({exc.strerror or exc}); fix the channel's ca_file"
                ) from exc

        if not self._account.verify_tls:
            log.warning(
                "TLS certificate checks are off for this channel (verify_tls is "
                "false); anyone on the path can read its mail",
                server=self._where,
            )
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE

        return context

    def _starttls(self, smtp: smtplib.SMTP, context: ssl.SSLContext | None) -> None:
        if not smtp.has_extn("starttls"):
            self._discard()
            raise PermanentDeliveryError(
                f"{self._where} does not offer STARTTLS, and the channel does not "
                "allow sending unencrypted; check the port, or set the channel's "
                "security to tls if the port speaks TLS from the start"
            )

        with self._translated("STARTTLS"):
            smtp.starttls(context=context)
            smtp.ehlo_or_helo_if_needed()

    def _login(self, smtp: smtplib.SMTP, password: str) -> None:
        """AUTH PLAIN, or LOGIN where PLAIN is not offered.

        smtplib's own login() cannot send a non-ASCII password and tries
        every mechanism after a refusal, which counts as several failed
        logins against the account.
        """
        offered = smtp.esmtp_features.get("auth", "").upper().split()
        username = self._account.username
        with self._translated("AUTH"):
            if "PLAIN" in offered:
                secret = f"\0{username}\0{password}".encode()
                reply = Reply.of(*smtp.docmd("AUTH", f"PLAIN {_b64(secret)}"))
            elif "LOGIN" in offered:
                reply = Reply.of(*smtp.docmd("AUTH", "LOGIN"))
                if reply.code == 334:
                    reply = Reply.of(*smtp.docmd(_b64(username.encode())))
                if reply.code == 334:
                    reply = Reply.of(*smtp.docmd(_b64(password.encode())))
            else:
                self._discard()
                raise PermanentDeliveryError(
                    f"{self._where} offers no AUTH mechanism Mailroom speaks "
                    f"(PLAIN, LOGIN) on this connection; offered: "
                    f"{' '.join(offered) or 'none'}. Check the channel's security "
                    "setting: many servers offer AUTH only after STARTTLS"
                )

        self._settle_login(
            reply, f"refused the login of {username!r} ({reply}); {CREDENTIALS}"
        )

    def _settle_login(self, reply: Reply, refused: str) -> None:
        if reply.code == 235:
            return

        self._discard()
        if 400 <= reply.code < 500:
            raise TemporaryDeliveryError(
                f"{self._where} could not check the credentials now ({reply})",
                reply.code,
            )
        raise PermanentDeliveryError(f"{self._where} {refused}", reply.code)

    def _login_with_token(self, smtp: smtplib.SMTP, bearer: Bearer) -> None:
        """AUTH XOAUTH2; a refused token is renewed and tried once more."""
        offered = smtp.esmtp_features.get("auth", "").upper().split()
        if "XOAUTH2" not in offered:
            self._discard()
            raise PermanentDeliveryError(
                f"{self._where} does not offer AUTH XOAUTH2 on this connection "
                f"(offered: {' '.join(offered) or 'none'}); sign in with a "
                "password instead, or check the security setting: many servers "
                "offer AUTH only after STARTTLS"
            )

        token = self._token(bearer)
        reply = self._xoauth2(smtp, token)
        if reply.code == 535:
            bearer.forget_token()
            renewed = self._token(bearer)
            if renewed != token:
                reply = self._xoauth2(smtp, renewed)

        username = self._account.username
        self._settle_login(
            reply,
            f"refused the OAuth token for {username!r} ({reply}); check that the "
            "user name is the mailbox the token is for and that the app has the "
            "SMTP permission",
        )

    def _token(self, bearer: Bearer) -> str:
        try:
            return bearer.access_token()
        except ChannelConnectError as exc:
            self._discard()
            raise TemporaryDeliveryError(f"cannot sign in to send: {exc}") from exc
        except ChannelError as exc:
            self._discard()
            raise PermanentDeliveryError(f"cannot sign in to send: {exc}") from exc

    def _xoauth2(self, smtp: smtplib.SMTP, token: str) -> Reply:
        with self._translated("AUTH"):
            initial = xoauth2_b64(self._account.username, token)
            reply = Reply.of(*smtp.docmd("AUTH", f"XOAUTH2 {initial}"))
            if reply.code == 334:
                # The server's challenge holds the error as JSON; an empty
                # line ends the exchange and brings the final reply.
                reply = Reply.of(*smtp.docmd(""))
        return reply

    def _mail_options(self, smtp: smtplib.SMTP, size: int) -> list[str]:
        return [f"SIZE={size}"] if smtp.has_extn("size") else []

    def _reset(self) -> None:
        """Leave the connection ready for the next message, or drop it."""
        if self._smtp is None:
            return

        try:
            self._smtp.rset()
        except (smtplib.SMTPException, OSError):
            self._discard()

    def _discard(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()

    def _timed_out(self, stage: str) -> TemporaryDeliveryError:
        return TemporaryDeliveryError(
            f"{self._where} did not answer within {self._timeout:g} s "
            f"during {stage}; if this persists, check that the server is up "
            "and MAILROOM_SMTP_TIMEOUT_SECONDS is long enough"
        )

    @contextmanager
    def _translated(self, stage: str) -> Iterator[None]:
        """Turn what smtplib, ssl and socket raise into delivery errors."""
        try:
            yield
        except smtplib.SMTPResponseException as exc:
            # Raised by connect (the greeting), EHLO and STARTTLS.
            self._discard()
            reply = Reply.of(exc.smtp_code, exc.smtp_error)
            error = (
                TemporaryDeliveryError if reply.code < 500 else PermanentDeliveryError
            )
            raise error(
                f"{self._where} answered {reply} to {stage}", reply.code
            ) from exc
        except (smtplib.SMTPServerDisconnected, *TLS_CLOSED) as exc:
            self._discard()
            if isinstance(exc.__context__, TimeoutError):
                # smtplib reports a reply that never came as a disconnect.
                raise self._timed_out(stage) from exc

            raise TemporaryDeliveryError(
                f"{self._where} closed the connection during {stage}"
            ) from exc
        except ssl.SSLCertVerificationError as exc:
            self._discard()
            raise PermanentDeliveryError(
                f"the TLS certificate of {self._where} is not trusted "
                f"({exc.verify_message}); give the channel the CA that signed it "
                "(ca_file) or correct the host name"
            ) from exc
        except ssl.SSLError as exc:
            self._discard()
            if stage not in HANDSHAKES:
                raise TemporaryDeliveryError(
                    f"TLS with {self._where} failed during {stage} ({exc.reason})"
                ) from exc

            raise PermanentDeliveryError(
                f"TLS with {self._where} failed during {stage} ({exc.reason}); "
                "check that the channel's port and security (tls, starttls) "
                "match the server"
            ) from exc
        except TimeoutError as exc:
            self._discard()
            raise self._timed_out(stage) from exc
        except (smtplib.SMTPException, OSError) as exc:
            self._discard()
            raise TemporaryDeliveryError(
                f"{self._where} could not be reached during {stage} "
                f"({exc.strerror or type(exc).__name__}); if this persists, "
                "check the channel's host and port"
            ) from exc


def _check_envelope_address(address: str) -> None:
    # smtplib would send a non-ASCII address only with SMTPUTF8, and a line
    # break in one would end the command early.
    if not ENVELOPE_ADDRESS.match(address):
        raise PermanentDeliveryError(
            f"{address!r} cannot go in an SMTP envelope: it must be ASCII "
            "without spaces, angle brackets or line breaks"
        )


def _data_pieces(message: bytes) -> Iterator[bytes]:
    """``message`` as DATA carries it, in pieces of whole lines.

    Line ends become CRLF and a dot that starts a line is doubled, as
    smtplib's data() does, a piece at a time; the last piece holds the
    closing dot, so a short message goes out in one write.
    """
    start = 0
    while True:
        end = message.find(b"\n", start + DATA_PIECE) + 1 or len(message)
        piece = LEADING_DOT.sub(b"..", LINE_END.sub(b"\r\n", message[start:end]))
        if end < len(message):
            yield piece
            start = end
            continue

        if not piece.endswith(b"\r\n"):
            piece += b"\r\n"

        yield piece + b".\r\n"
        return


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
