"""Process settings, read once from ``MAILROOM_``-prefixed environment variables.

Every service reads the same object; each field says its unit and default.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAILROOM_", extra="ignore")

    database_url: SecretStr = Field(
        SecretStr("postgresql://postgres@127.0.0.1:5432/mailroom"),
        description=(
            "PostgreSQL connection URL shared by every process; it may hold a "
            "password, so it is never logged."
        ),
    )
    amqp_url: SecretStr = Field(
        SecretStr("amqp://guest:guest@127.0.0.1:5672//"),
        description="RabbitMQ URL; it may hold a password, so it is never logged.",
    )
    broker_prefix: str = Field(
        "mailroom",
        pattern=r"^[a-z][a-z0-9_-]{0,40}$",
        description="Prefix of every exchange and queue this deployment declares.",
    )
    queue_type: str = Field(
        "classic",
        pattern=r"^(classic|quorum)$",
        description="RabbitMQ queue type for the durable work queues.",
    )
    delivery_limit: int = Field(
        5,
        ge=1,
        description="Deliveries of one message before it is quarantined.",
    )
    secret_keys: SecretStr | None = Field(
        None,
        description=(
            "Comma-separated Fernet keys that encrypt stored passwords and "
            "tokens; the first encrypts, all decrypt (rotation)."
        ),
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description=(
            "Port of the /metrics, /livez and /readyz endpoint; default per "
            "service (poller 9101, router 9102, sender 9103), 0 disables it."
        ),
    )
    metrics_host: str = Field("127.0.0.1", description="Address to serve metrics on.")
    prefetch: int = Field(
        200, ge=1, le=10_000, description="Unacknowledged deliveries per consumer."
    )
    poll_interval_seconds: float = Field(
        30.0, gt=0, description="Seconds between polls of one mailbox."
    )
    lease_seconds: float = Field(
        60.0,
        gt=0,
        description="How long a poller owns a channel before another may take it.",
    )
    fetch_batch: int = Field(
        200, ge=1, le=5000, description="Messages fetched per IMAP FETCH command."
    )
    inline_max_bytes: int = Field(
        MIB,
        ge=1024,
        le=8 * MIB,
        description=(
            "Raw messages and attachments larger than this travel by claim check "
            "(stored in PostgreSQL) rather than inside the broker message."
        ),
    )
    attachment_limit_bytes: int = Field(
        20 * MIB,
        ge=1,
        description="Largest attachment routed or sent (20 MiB).",
    )
    max_message_bytes: int = Field(
        64 * MIB,
        ge=MIB,
        description=(
            "Largest inbound message downloaded; larger ones are quarantined "
            "with their size, without their content."
        ),
    )
    smtp_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="Timeout of one network operation with a mail server.",
    )
    retry_delays_seconds: list[int] = Field(
        [5, 30, 120, 600, 1800],
        min_length=1,
        description=(
            "Waits before each retry of a temporarily failed send, in seconds; "
            "after the last one the send fails. JSON list in the environment."
        ),
    )
    validate_allow_private_addresses: bool = Field(
        False,
        description=(
            "Let Validate connect to loopback, private (10/8, 172.16/12, "
            "192.168/16, fc00::/7) and link-local addresses, for test servers "
            "on a private network; cloud metadata addresses stay refused."
        ),
    )
    loop_sender_limit: int = Field(
        20,
        ge=1,
        description=(
            "Messages from one sender address to one channel within a loop "
            "window above which each further one is flagged loop_suspected "
            "(two auto-responders answering each other); it is still routed."
        ),
    )
    loop_window_seconds: int = Field(
        600,
        ge=1,
        description=(
            "Length of the fixed time windows, in seconds, in which messages per "
            "sender are counted for MAILROOM_LOOP_SENDER_LIMIT."
        ),
    )
    log_level: str = Field("info", pattern=r"^(debug|info|warning|error)$")

    @model_validator(mode="after")
    def _inline_fits_broker(self) -> Settings:
        if self.inline_max_bytes >= self.attachment_limit_bytes:
            raise ValueError(
                "MAILROOM_INLINE_MAX_BYTES must be smaller than "
                "MAILROOM_ATTACHMENT_LIMIT_BYTES: large attachments must travel "
                "by claim check"
            )
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
