"""Structured JSON logging for every service, with secrets redacted in one place."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

SECRET_KEYS = re.compile(
    r"pass(word)?|secret|token|authorization|api[_-]?key|credential", re.I
)
URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^:/@\s]+:)[^@\s]+@", re.I)
REDACTED = "[redacted]"


class _Service:
    """Adds the service's name to every line, from any thread.

    Context variables bound on the main thread do not reach threads started
    later (IDLE watchers, the metrics server), so the name is kept here.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(
        self, _logger: Any, _method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event.setdefault("service", self.name)
        return event


def redact_secrets(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Blank values under secret-looking keys and passwords inside URLs."""
    for key, value in list(event.items()):
        if SECRET_KEYS.search(key) and value is not None:
            event[key] = REDACTED
        elif isinstance(value, str) and "@" in value:
            event[key] = URL_PASSWORD.sub(rf"\g<scheme>{REDACTED}@", value)
    return event


def configure_logging(service: str, level: str = "info") -> None:
    """Log one JSON object per line on stderr, bound to the service name."""
    logging.basicConfig(
        format="%(message)s", stream=sys.stderr, level=level.upper(), force=True
    )
    for noisy in (
        "amqp",
        "kombu",
        "psycopg",
        "aiosmtpd",
        "mail.log",
        "msal",
        "urllib3",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _Service(service),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
