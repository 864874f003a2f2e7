"""Who may use the admin API: named tokens with a role, and console sessions.

A token is shown once, when it is created, and stored only as its SHA-256.
The console trades a token for a session cookie, stored the same way; a
session ends when it expires, at logout, or when its token is revoked. The
role is read from the token at every request, so revoking a token or
changing its role takes effect at once.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from enum import StrEnum

import psycopg
from pydantic import BaseModel, ConfigDict

from shared.db import DbConnection
from shared.errors import NotFoundError, ValidationFailed

# Marks a string as a Mailroom token (for secret scanners and people).
TOKEN_PREFIX = "mr_"  # noqa: S105 - a visible prefix, not a secret
SESSION_HOURS = 12


class Role(StrEnum):
    READ_ONLY = "read-only"  # may read everything and try filters
    ADMIN = "admin"  # may also change the configuration


class Principal(BaseModel):
    """The token a request was made with; never holds the token itself."""

    model_config = ConfigDict(frozen=True)

    token_id: int
    name: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


class TokenInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    name: str
    role: Role
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class TokenStore:
    def __init__(self, conn: DbConnection) -> None:
        self.conn = conn

    def create(self, name: str, role: Role | str) -> tuple[TokenInfo, str]:
        """A new token; the second value is the token, which is not kept."""
        try:
            role = Role(role)
        except ValueError as exc:
            raise ValidationFailed("role", "use read-only or admin") from exc

        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        try:
            row = self.conn.execute(
                "INSERT INTO api_tokens (name, role, token_hash) VALUES (%s, %s, %s) "
                "RETURNING id, name, role, created_at, last_used_at, revoked_at",
                (name, role.value, _digest(token)),
            ).fetchone()
        except psycopg.errors.UniqueViolation as exc:
            raise ValidationFailed("name", f"a token named {name!r} exists") from exc
        except psycopg.errors.CheckViolation as exc:
            raise ValidationFailed(
                "name",
                "use letters, digits, '.', '_', '@' and '-' (up to 63), starting "
                "with a letter or digit",
            ) from exc
        assert row is not None
        return TokenInfo(**row), token

    def tokens(self) -> list[TokenInfo]:
        rows = self.conn.execute(
            "SELECT id, name, role, created_at, last_used_at, revoked_at "
            "FROM api_tokens ORDER BY name"
        ).fetchall()
        return [TokenInfo(**r) for r in rows]

    def revoke(self, name: str) -> None:
        with self.conn.transaction():
            row = self.conn.execute(
                "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) "
                "WHERE name = %s RETURNING id",
                (name,),
            ).fetchone()
            if row is None:
                raise NotFoundError(f"no token {name!r}; list them with `token list`")
            self.conn.execute(
                "DELETE FROM console_sessions WHERE token_id = %s", (row["id"],)
            )

    def authenticate(self, token: str) -> Principal | None:
        row = self.conn.execute(
            """
            UPDATE api_tokens SET last_used_at = now()
            WHERE token_hash = %s AND revoked_at IS NULL
            RETURNING id, name, role
            """,
            (_digest(token),),
        ).fetchone()
        if row is None:
            return None
        return Principal(token_id=row["id"], name=row["name"], role=row["role"])

    def open_session(self, token: str) -> tuple[Principal, str] | None:
        """A new session for a valid token, and the cookie value naming it."""
        principal = self.authenticate(token)
        if principal is None:
            return None

        session = secrets.token_urlsafe(32)
        self.conn.execute("DELETE FROM console_sessions WHERE expires_at < now()")
        self.conn.execute(
            "INSERT INTO console_sessions (session_hash, token_id, expires_at) "
            "VALUES (%s, %s, now() + make_interval(hours => %s))",
            (_digest(session), principal.token_id, SESSION_HOURS),
        )
        return principal, session

    def session(self, session: str) -> Principal | None:
        row = self.conn.execute(
            """
            SELECT t.id, t.name, t.role FROM console_sessions s
            JOIN api_tokens t ON t.id = s.token_id
            WHERE s.session_hash = %s AND s.expires_at > now()
              AND t.revoked_at IS NULL
            """,
            (_digest(session),),
        ).fetchone()
        if row is None:
            return None
        return Principal(token_id=row["id"], name=row["name"], role=row["role"])

    def close_session(self, session: str) -> None:
        self.conn.execute(
            "DELETE FROM console_sessions WHERE session_hash = %s", (_digest(session),)
        )
