"""The one root of Mailroom's errors, with a subtree per subsystem.

Library errors are wrapped where the library is called, and each message says
what an operator can do about it.
"""

from __future__ import annotations


class MailroomError(Exception):
    """Base of every error Mailroom raises on purpose."""


class ConfigurationError(MailroomError):
    """Settings or stored configuration that cannot work as given."""


class NotFoundError(MailroomError):
    """A campaign, channel or filter that does not exist."""


class ValidationFailed(MailroomError):
    """Input an administrator gave that breaks a rule; the text names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class DatabaseUnavailable(ConfigurationError):
    """PostgreSQL cannot be reached; a running service retries, a command stops."""


class SecretsError(ConfigurationError):
    """Stored secrets that cannot be encrypted or decrypted with the keys given."""


class BrokerError(MailroomError):
    """RabbitMQ refused or lost a message; the work is retried, not dropped."""


class PublishNotConfirmed(BrokerError):
    """The broker nacked a publish or did not confirm it in time."""


class ChannelError(MailroomError):
    """A mailbox or mail server of one channel failed."""


class ChannelConnectError(ChannelError):
    """The server could not be reached (DNS, refused, timeout, TLS)."""


class ChannelAuthError(ChannelError):
    """The server refused the channel's credentials."""


class ChannelProtocolError(ChannelError):
    """The server answered something the protocol does not allow here."""


class MessageRejected(MailroomError):
    """A message that cannot be processed; it goes to quarantine with this reason."""


class DeliveryError(MailroomError):
    """An outbound message the mail server did not accept."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class TemporaryDeliveryError(DeliveryError):
    """Worth retrying later: 4xx replies, timeouts, dropped connections."""


class PermanentDeliveryError(DeliveryError):
    """Will fail again: 5xx replies, refused recipients, oversized mail."""
