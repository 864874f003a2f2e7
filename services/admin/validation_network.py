"""The network side of a validation: time, names, addresses and connections.

Every probe connects through one ``Dialer``. It resolves a host name once,
with the resolver it was given, and refuses addresses where no customer's mail
server belongs (loopback, private, link-local) unless private addresses are
allowed; cloud metadata addresses are refused always. It then connects to the
very address it checked, so a name that resolves elsewhere a moment later
cannot redirect the probe; TLS still checks the certificate against the
configured host name.

``Budget`` bounds each network step and the validation as a whole.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any, TypeVar

from services.admin.validation_verdicts import Kind, StepFailed
from services.poller.imap import tls_context
from shared.accounts import Security
from shared.errors import ChannelConnectError

Resolver = Callable[..., list[tuple[Any, ...]]]
E = TypeVar("E", bound=BaseException)

METADATA = frozenset({ip_address("169.254.169.254"), ip_address("fd00:ec2::254")})
NOT_PUBLIC = (
    # Connecting to 0.0.0.0 or :: reaches this very host.
    (ip_network("0.0.0.0/8"), "an address of this host"),
    (ip_network("::/128"), "an address of this host"),
    (ip_network("127.0.0.0/8"), "a loopback address"),
    (ip_network("::1/128"), "a loopback address"),
    (ip_network("10.0.0.0/8"), "a private address"),
    (ip_network("172.16.0.0/12"), "a private address"),
    (ip_network("192.168.0.0/16"), "a private address"),
    (ip_network("fc00::/7"), "a private address"),
    (ip_network("169.254.0.0/16"), "a link-local address"),
    (ip_network("fe80::/10"), "a link-local address"),
)
SECURED = {
    Security.TLS: "with implicit TLS",
    Security.STARTTLS: "after STARTTLS",
    Security.NONE: "without TLS",
}
# OpenSSL's verify codes for a certificate of an unknown or untrusted issuer,
# and for one issued to another name.
UNTRUSTED_ISSUER = frozenset({2, 18, 19, 20, 21})
OTHER_NAME = frozenset({62, 64})


class Budget:
    """Seconds left for the validation, and for each step within it."""

    def __init__(self, total: float, step: float) -> None:
        self.step_seconds = step
        self._end = time.monotonic() + total

    def remaining(self) -> float:
        return self._end - time.monotonic()

    def step(self) -> float:
        """The timeout of the next network step; none is left after the end."""
        left = self.remaining()
        if left <= 0:
            raise StepFailed(
                Kind.TIMEOUT,
                "the validation ran out of time before it could finish; the "
                "servers answer too slowly, try again or check them",
            )
        return min(self.step_seconds, left)


@dataclass(frozen=True)
class Endpoint:
    """A server a probe talks to, and the direction whose settings name it."""

    direction: str
    protocol: str
    host: str
    port: int
    # The setting that holds host, port and scheme, when it is not "host".
    address_setting: str = ""

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"the {self.protocol} server {host}:{self.port}"

    def field(self, name: str) -> str:
        if self.address_setting and name in ("host", "port", "security"):
            name = self.address_setting
        return f"{self.direction}.{name}"


def refusal(address: IPv4Address | IPv6Address, *, allow_private: bool) -> str:
    """Why a probe may not connect to ``address``; empty when it may."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped

    if address in METADATA:
        return "a cloud metadata address"
    if allow_private:
        return ""

    for network, what in NOT_PUBLIC:
        if address.version == network.version and address in network:
            return what
    return ""


class Dialer:
    """Resolves, checks and connects, for every probe of one validation."""

    def __init__(self, resolve: Resolver, allow_private: bool, budget: Budget):
        self.budget = budget
        self._resolve = resolve
        self._allow_private = allow_private

    def addresses(self, endpoint: Endpoint) -> list[tuple[Any, ...]]:
        """The endpoint's addresses, each one allowed, as getaddrinfo gives them."""
        try:
            answers = self._resolve(endpoint.host, endpoint.port, 0, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise StepFailed(
                Kind.DNS_FAILURE,
                f"the host name {endpoint.host!r} of {endpoint} could not be "
                f"resolved ({exc.strerror or exc}); check the host name",
                endpoint.field("host"),
            ) from exc
        except OSError as exc:
            raise StepFailed(
                Kind.DNS_FAILURE,
                f"the host name {endpoint.host!r} of {endpoint} could not be "
                f"resolved ({exc.strerror or exc}); check the host name and that "
                "Mailroom can reach its DNS resolver",
                endpoint.field("host"),
            ) from exc

        if not answers:
            raise StepFailed(
                Kind.DNS_FAILURE,
                f"the host name {endpoint.host!r} of {endpoint} has no address; "
                "check the host name",
                endpoint.field("host"),
            )

        for answer in answers:
            self._check_address(endpoint, str(answer[4][0]))
        return answers

    def connect(
        self, endpoint: Endpoint, timeout: float | None = None
    ) -> socket.socket:
        """A socket connected to one of the endpoint's allowed addresses."""
        last: OSError | None = None
        seconds = 0.0
        for family, kind, proto, _name, address in self.addresses(endpoint):
            seconds = self.budget.step()
            if timeout is not None:
                seconds = min(seconds, timeout)

            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(seconds)
                sock.connect(address)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            return sock

        assert last is not None
        raise failure(last, endpoint, "connecting", seconds) from last

    def _check_address(self, endpoint: Endpoint, text: str) -> None:
        # A scoped IPv6 address (fe80::1%eth0) carries its interface.
        address = ip_address(text.split("%", 1)[0])
        reason = refusal(address, allow_private=self._allow_private)
        if not reason:
            return

        raise StepFailed(
            Kind.ADDRESS_NOT_ALLOWED,
            f"{endpoint} resolves to {address}, {reason}, which Validate does not "
            "try; give the server's public host name (to validate a test server "
            "on a private network, use `mailroom channel validate --allow-private` "
            "or set MAILROOM_VALIDATE_ALLOW_PRIVATE_ADDRESSES for the API)",
            endpoint.field("host"),
        )


def client_tls(verify: bool, ca_file: str | None, endpoint: Endpoint) -> ssl.SSLContext:
    """The TLS context the poller and sender would use for this account."""
    try:
        return tls_context(verify, ca_file, str(endpoint))
    except ChannelConnectError as exc:
        raise StepFailed(Kind.BAD_SETTING, str(exc), endpoint.field("ca_file")) from exc


def failure(
    exc: BaseException, endpoint: Endpoint, doing: str, timeout: float
) -> StepFailed:
    """The verdict for what a socket, TLS or a client library raised."""
    if isinstance(exc, StepFailed):
        return exc

    cert = found(exc, ssl.SSLCertVerificationError)
    if cert is not None:
        return _certificate(cert, endpoint)

    tls = found(exc, ssl.SSLError)
    if tls is not None:
        return StepFailed(
            Kind.TLS_FAILURE,
            f"TLS with {endpoint} failed while {doing} ({tls.reason or tls}); check "
            "that the security setting matches the port: 'tls' for implicit TLS "
            "(993, 995, 465), 'starttls' or 'none' for the plain ports (143, 110, "
            "587, 25)",
            endpoint.field("security"),
        )

    if found(exc, TimeoutError) is not None:
        return StepFailed(
            Kind.TIMEOUT,
            f"{endpoint} did not answer within {timeout:g} s while {doing}; check "
            "the host and port, that a firewall lets Mailroom through, and that "
            "the port does not expect TLS when security is 'none' or 'starttls'",
        )

    if found(exc, ConnectionRefusedError) is not None:
        return StepFailed(
            Kind.CONNECTION_REFUSED,
            f"{endpoint} refused the connection; check the host and port, and "
            "that the server is running",
            endpoint.field("port"),
        )

    if doing == "connecting" and isinstance(exc, OSError):
        return StepFailed(
            Kind.CONNECTION_REFUSED,
            f"could not connect to {endpoint} ({exc.strerror or exc}); check the "
            "host and port, and the network between Mailroom and the server",
            endpoint.field("host"),
        )

    return StepFailed(
        Kind.PROTOCOL_ERROR,
        f"the connection to {endpoint} failed while {doing} "
        f"({type(exc).__name__}: {exc}); check the host, port and security setting",
    )


def _certificate(exc: ssl.SSLCertVerificationError, endpoint: Endpoint) -> StepFailed:
    said = f"certificate verify failed: {exc.verify_message}"
    if exc.verify_code in OTHER_NAME:
        return StepFailed(
            Kind.TLS_FAILURE,
            f"the TLS certificate of {endpoint} was issued for another host name "
            f"({said}); set the host to a name the certificate is for, or have "
            "the server's certificate fixed",
            endpoint.field("host"),
        )

    field = endpoint.field("ca_file") if exc.verify_code in UNTRUSTED_ISSUER else None
    return StepFailed(
        Kind.TLS_FAILURE,
        f"the TLS certificate of {endpoint} could not be verified ({said}); give "
        "the channel the issuing CA in ca_file, or have the server's certificate "
        "fixed",
        field,
    )


def found(exc: BaseException, kind: type[E]) -> E | None:
    """``exc`` or the first exception of ``kind`` behind it."""
    for candidate in chain(exc):
        if isinstance(candidate, kind):
            return candidate
    return None


def chain(exc: BaseException) -> Iterator[BaseException]:
    """An exception and those behind it: causes, contexts, and the reasons and
    arguments that urllib3 and requests wrap their causes in."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue

        seen.add(id(current))
        yield current
        behind = [
            current.__cause__,
            current.__context__,
            getattr(current, "reason", None),
        ]
        behind.extend(current.args)
        pending.extend(item for item in behind if isinstance(item, BaseException))


def require_password(password: str, endpoint: Endpoint) -> None:
    """Stop before connecting when there is no password to log in with."""
    if password:
        return

    raise StepFailed(
        Kind.BAD_SETTING,
        f"no {endpoint.direction} password is stored for this channel, so "
        f"{endpoint} cannot be logged in to; enter the password",
        endpoint.field("password"),
    )


def next_step(sock: socket.socket, dialer: Dialer) -> float:
    """Give the next step its own timeout, within what is left."""
    seconds = dialer.budget.step()
    sock.settimeout(seconds)
    return seconds


def broke_off(endpoint: Endpoint, doing: str, exc: BaseException) -> StepFailed:
    """The verdict for a server that ended the session in the middle."""
    return StepFailed(
        Kind.PROTOCOL_ERROR,
        f"{endpoint} broke off while {doing} ({server_words(exc)}); check the host, "
        "port and security setting, and try again",
    )


def server_words(exc: BaseException) -> str:
    """The server's words from an imaplib or poplib error, without b'' quoting."""
    reply = exc.args[0] if exc.args else ""
    if isinstance(reply, bytes):
        reply = reply.decode("utf-8", "replace")

    text = str(reply)
    for prefix in ("b'", 'b"'):
        if prefix in text and text.endswith(prefix[-1]):
            head, _, body = text.partition(prefix)
            text = head + body[:-1]
    return " ".join(text.split())[:300] or type(exc).__name__
