"""Validate: try a channel's inbound and outbound settings, one verdict each.

``validate_channel`` probes both directions at once, each in a thread of its
own, and answers within 60 s whatever the servers do: every network step has
its own timeout (10 s) within the time left, and a probe still running at the
end is reported as a timeout. A probe goes as far as polling or sending would
before touching mail: it reads nothing, moves nothing and sends nothing.

Host names are resolved once, with the resolver given, and addresses outside
the public internet are refused unless private ones are allowed (test
servers); cloud metadata addresses are refused always. The probe modules
(``validation_imap``, ``validation_pop3``, ``validation_smtp``,
``validation_graph``) say what each protocol checks.

``record_validation`` keeps the report on the channel, where the channel's
status comes from, with any refresh token that signing in rotated.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, PrivateAttr

from services.admin.validation_graph import Credentials, mail_token, probe_graph
from services.admin.validation_imap import probe_imap
from services.admin.validation_network import Budget, Dialer, Resolver
from services.admin.validation_pop3 import probe_pop3
from services.admin.validation_smtp import probe_smtp
from services.admin.validation_verdicts import Kind, StepFailed, Verdict
from shared.accounts import ImapAccount, Pop3Account, SmtpAccount
from shared.catalog import Catalog, Channel
from shared.db import DbConnection
from shared.logs import get_logger
from shared.oauth import IMAP_SCOPES, POP3_SCOPES, SMTP_SCOPES
from shared.secrets import SecretBox
from shared.settings import Settings

__all__ = [
    "Kind",
    "ValidationReport",
    "Verdict",
    "record_validation",
    "validate_channel",
]

log = get_logger(__name__)

STEP_SECONDS = 10.0
TOTAL_SECONDS = 60.0
# The probes' own time ends this much before the deadline, so a step that
# times out at the end reports what it was doing, not just the deadline.
PROBES_END_EARLY_SECONDS = 1.0
# The answer is due this much before the deadline: the caller still has to
# record and send it within the time promised.
ANSWER_EARLY_SECONDS = 0.2
REDACTED = "[redacted]"
SCRUB_MIN_CHARS = 4

Probe = Callable[[], Verdict]


class ValidationReport(BaseModel):
    """What one validation found; holds no secret, as every admin sees it."""

    model_config = ConfigDict(frozen=True)

    inbound: Verdict
    outbound: Verdict
    ok: bool
    checked_at: datetime
    seconds: float
    message: str
    _rotated: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def rotated_secrets(self) -> dict[str, str]:
        """Secrets signing in replaced (a refresh token), to store for polling."""
        return dict(self._rotated)

    def lines(self) -> list[str]:
        """One line per direction, as the CLI prints them."""
        return [self.inbound.line("inbound"), self.outbound.line("outbound")]


def validate_channel(
    channel: Channel,
    secrets: Mapping[str, str],
    settings: Settings,
    *,
    resolve: Resolver = socket.getaddrinfo,
    allow_private: bool | None = None,
    step_seconds: float = STEP_SECONDS,
    total_seconds: float = TOTAL_SECONDS,
) -> ValidationReport:
    """Try the channel's accounts now; answers within ``total_seconds``.

    ``allow_private`` lets the probes reach loopback and private addresses;
    by default MAILROOM_VALIDATE_ALLOW_PRIVATE_ADDRESSES decides.
    """
    if allow_private is None:
        allow_private = bool(
            getattr(settings, "validate_allow_private_addresses", False)
        )
    started = time.monotonic()
    checked_at = datetime.now(UTC)
    budget = Budget(max(total_seconds - PROBES_END_EARLY_SECONDS, 0.0), step_seconds)
    dialer = Dialer(resolve, allow_private, budget)
    credentials = Credentials(secrets)

    verdicts = _run_both(
        {
            "inbound": lambda: _inbound(channel, credentials, dialer),
            "outbound": lambda: _outbound(channel, credentials, dialer),
        },
        deadline=started + max(total_seconds - ANSWER_EARLY_SECONDS, 0.0),
        total_seconds=total_seconds,
    )

    rotated = credentials.rotated()
    hidden = [*secrets.values(), *rotated.values()]
    inbound = _scrubbed(verdicts["inbound"], hidden)
    outbound = _scrubbed(verdicts["outbound"], hidden)
    report = ValidationReport(
        inbound=inbound,
        outbound=outbound,
        ok=inbound.ok and outbound.ok,
        checked_at=checked_at,
        seconds=round(time.monotonic() - started, 3),
        message=_summary(inbound, outbound),
    )
    report._rotated = rotated

    log.info(
        "channel validated",
        channel_id=channel.id,
        ok=report.ok,
        inbound=inbound.kind.value,
        outbound=outbound.kind.value,
        seconds=report.seconds,
    )
    return report


def record_validation(
    conn: DbConnection,
    channel_id: int,
    report: ValidationReport,
    *,
    box: SecretBox | None = None,
) -> Channel:
    """Keep the report on the channel, and a refresh token it rotated.

    ``box`` encrypts the rotated token; it is needed only when there is one.
    """
    catalog = Catalog(conn, box)
    rotated = report.rotated_secrets
    if rotated and box is None:
        raise ValueError(
            "this validation rotated the channel's refresh token; pass the "
            "SecretBox so it is stored, or the next poll cannot sign in"
        )

    with conn.transaction():
        if rotated:
            # Changing secrets clears the last validation; this one follows.
            catalog.update_channel(channel_id, secrets=rotated)
        return catalog.record_validation(channel_id, report.model_dump(mode="json"))


def _inbound(channel: Channel, credentials: Credentials, dialer: Dialer) -> Verdict:
    account = channel.inbound
    if account is None:
        return Verdict.failed(
            Kind.NOT_CONFIGURED,
            "the channel has no inbound account, so there is no mailbox to poll; "
            "add one",
            "inbound",
        )

    if isinstance(account, ImapAccount):
        token = None
        if account.oauth2 is not None:
            token = mail_token(
                account.oauth2, "inbound", IMAP_SCOPES, credentials, dialer
            )
        return probe_imap(
            account,
            credentials.get("inbound_password"),
            dialer,
            all_folders=channel.sync_all_folders,
            token=token,
        )
    if isinstance(account, Pop3Account):
        token = None
        if account.oauth2 is not None:
            token = mail_token(
                account.oauth2, "inbound", POP3_SCOPES, credentials, dialer
            )
        return probe_pop3(
            account, credentials.get("inbound_password"), dialer, token=token
        )
    return probe_graph(account, "inbound", credentials, dialer)


def _outbound(channel: Channel, credentials: Credentials, dialer: Dialer) -> Verdict:
    account = channel.outbound
    if account is None:
        # A channel that only receives is complete: its status stays working.
        return Verdict(
            ok=True,
            kind=Kind.NOT_CONFIGURED,
            message="the channel has no outbound account, so replies cannot be "
            "sent from it; add one to reply",
            field="outbound",
        )

    if isinstance(account, SmtpAccount):
        password = credentials.get("outbound_password") or None
        token = None
        if account.oauth2 is not None:
            token = mail_token(
                account.oauth2, "outbound", SMTP_SCOPES, credentials, dialer
            )
        return probe_smtp(account, password, dialer, token=token)
    return probe_graph(account, "outbound", credentials, dialer)


def _run_both(
    probes: dict[str, Probe], *, deadline: float, total_seconds: float
) -> dict[str, Verdict]:
    """Each probe's verdict, or a timeout for one still running at the deadline.

    The threads are daemons: a probe past the deadline ends at its own step
    timeout, and holds up neither the answer nor the process's exit.
    """
    results: dict[str, Verdict] = {}
    lock = threading.Lock()
    threads = [
        threading.Thread(
            target=_run,
            args=(direction, probe, results, lock),
            name=f"validate-{direction}",
            daemon=True,
        )
        for direction, probe in probes.items()
    ]
    for thread in threads:
        thread.start()

    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))

    with lock:
        return {
            direction: results.get(direction) or _unfinished(total_seconds)
            for direction in probes
        }


def _run(
    direction: str, probe: Probe, results: dict[str, Verdict], lock: threading.Lock
) -> None:
    try:
        verdict = probe()
    except StepFailed as stop:
        verdict = stop.verdict
    except Exception as exc:
        # A validation answers with a verdict, even about its own fault.
        log.error("validation probe failed", direction=direction, exc_info=True)
        verdict = Verdict.failed(
            Kind.PROTOCOL_ERROR,
            f"the {direction} check failed in an unexpected way "
            f"({type(exc).__name__}); the admin service's log has the details",
        )

    log.debug("validation probe done", direction=direction, kind=verdict.kind.value)
    with lock:
        results[direction] = verdict


def _unfinished(total_seconds: float) -> Verdict:
    return Verdict.failed(
        Kind.TIMEOUT,
        f"the servers did not let the check finish within {total_seconds:g} s; "
        "check that they are up and reachable, and try again",
    )


def _scrubbed(verdict: Verdict, secrets: Iterable[str]) -> Verdict:
    """The verdict without any secret value, should a server have echoed one.

    Values shorter than SCRUB_MIN_CHARS are left alone: they turn up inside
    ordinary words, and blanking those would garble every message.
    """
    message = verdict.message
    for value in secrets:
        if len(value) >= SCRUB_MIN_CHARS:
            message = message.replace(value, REDACTED)

    if message == verdict.message:
        return verdict
    return verdict.model_copy(update={"message": message})


def _summary(inbound: Verdict, outbound: Verdict) -> str:
    """One sentence for the channel's status: the failures, or that it works."""
    failed = [
        f"{direction} {verdict.kind.value}: {verdict.message}"
        for direction, verdict in (("inbound", inbound), ("outbound", outbound))
        if not verdict.ok
    ]
    if failed:
        return "; ".join(failed)
    if outbound.kind is Kind.NOT_CONFIGURED:
        return "inbound works; no outbound account"
    return "inbound and outbound work"
