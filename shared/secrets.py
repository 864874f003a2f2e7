"""Encryption at rest of channel passwords, client secrets and OAuth tokens.

Keys come from ``MAILROOM_SECRET_KEYS``: the first key encrypts, every key
decrypts, so a new key is rolled out by putting it first and re-encrypting
(``mailroom secrets rotate``) before the old one is dropped.
"""

from __future__ import annotations

import json

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic import SecretStr

from shared.errors import SecretsError


def generate_key() -> str:
    return Fernet.generate_key().decode()


class SecretBox:
    def __init__(self, keys: SecretStr | str | None) -> None:
        raw = keys.get_secret_value() if isinstance(keys, SecretStr) else keys
        parts = [k.strip() for k in (raw or "").split(",") if k.strip()]
        self._fernet: MultiFernet | None = None
        if parts:
            try:
                self._fernet = MultiFernet([Fernet(k.encode()) for k in parts])
            except ValueError as exc:
                raise SecretsError(
                    "MAILROOM_SECRET_KEYS holds a key that is not a Fernet key; "
                    "make one with `mailroom secrets new-key`"
                ) from exc

    def __repr__(self) -> str:
        return f"SecretBox(configured={self._fernet is not None})"

    def _require(self) -> MultiFernet:
        if self._fernet is None:
            raise SecretsError(
                "MAILROOM_SECRET_KEYS is not set, so passwords cannot be stored or "
                "read; make a key with `mailroom secrets new-key` and export it"
            )
        return self._fernet

    def seal(self, secrets: dict[str, str]) -> bytes | None:
        if not secrets:
            return None
        return self._require().encrypt(json.dumps(secrets).encode())

    def open(self, token: bytes | None) -> dict[str, str]:
        if not token:
            return {}
        try:
            data = self._require().decrypt(bytes(token))
        except InvalidToken as exc:
            raise SecretsError(
                "stored secrets cannot be decrypted with MAILROOM_SECRET_KEYS; "
                "the key that encrypted them is missing from the list"
            ) from exc
        result: dict[str, str] = json.loads(data)
        return result

    def seal_text(self, value: str) -> str:
        """``value`` encrypted and signed, safe to put in a URL."""
        return self._require().encrypt(value.encode()).decode("ascii")

    def open_text(self, token: str, *, max_age_seconds: int) -> str | None:
        """What ``seal_text`` sealed, or None if forged, garbled or too old."""
        try:
            data = self._require().decrypt(token.encode(), ttl=max_age_seconds)
        except (InvalidToken, ValueError):
            return None
        return data.decode()

    def rotate(self, token: bytes) -> bytes:
        return self._require().rotate(bytes(token))
