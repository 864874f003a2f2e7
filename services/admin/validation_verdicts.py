"""What a validation found about one direction of a channel: a ``Verdict``.

Each verdict has a kind from a closed set, so the console and the CLI can
react to it, and a message in plain words that says what to change. A check
that cannot go on raises ``StepFailed`` with the verdict; that is how a probe
stops early, not an error of Mailroom.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class Kind(StrEnum):
    OK = "ok"
    NOT_CONFIGURED = "not_configured"
    DNS_FAILURE = "dns_failure"
    CONNECTION_REFUSED = "connection_refused"
    TIMEOUT = "timeout"
    TLS_FAILURE = "tls_failure"
    AUTH_FAILURE = "auth_failure"
    FOLDER_MISSING = "folder_missing"
    GRAPH_TOKEN_ERROR = "graph_token_error"  # noqa: S105 - a kind, not a token
    GRAPH_PERMISSION_MISSING = "graph_permission_missing"
    # Signing in for an IMAP or SMTP XOAUTH2 login failed.
    TOKEN_ERROR = "token_error"  # noqa: S105 - a kind, not a token
    BAD_SETTING = "bad_setting"
    ADDRESS_NOT_ALLOWED = "address_not_allowed"
    PROTOCOL_ERROR = "protocol_error"


class Verdict(BaseModel):
    """The outcome for one direction; ``field`` names the setting at fault."""

    model_config = ConfigDict(frozen=True)

    ok: bool
    kind: Kind
    message: str
    field: str | None = None

    @classmethod
    def passed(cls, message: str) -> Verdict:
        return cls(ok=True, kind=Kind.OK, message=message)

    @classmethod
    def failed(cls, kind: Kind, message: str, field: str | None = None) -> Verdict:
        return cls(ok=False, kind=kind, message=message, field=field)

    def line(self, direction: str) -> str:
        """One line for a terminal, e.g. ``inbound  FAILED  auth_failure: ...``."""
        if self.ok:
            status = "OK" if self.kind is Kind.OK else "SKIPPED"
        else:
            status = "FAILED"
        return f"{direction:<9}{status:<8}{self.kind}: {self.message}"


class StepFailed(Exception):
    """Stops a probe with the verdict to report."""

    def __init__(self, kind: Kind, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.verdict = Verdict.failed(kind, message, field)
