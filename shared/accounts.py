"""Settings of a channel's inbound and outbound accounts.

Non-secret settings are stored as JSON on the channel; the password, client
secret or tokens are kept apart, encrypted (see ``shared.secrets``), and never
appear in these models' repr.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
IPV6 = re.compile(r"^[0-9A-Fa-f:.]+$")


class Security(StrEnum):
    TLS = "tls"  # implicit TLS from the first byte
    STARTTLS = "starttls"
    NONE = "none"


def check_host(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("a host name or address is required")
    if HOSTNAME.match(value) or (":" in value and IPV6.match(value)):
        return value
    raise ValueError(f"{value!r} is not a valid host name or IP address")


class _Account(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _ServerAccount(_Account):
    host: str
    port: int = Field(ge=1, le=65535)
    security: Security = Security.TLS
    username: str = Field(min_length=1)
    verify_tls: bool = Field(
        True, description="Check the server certificate and host name."
    )
    ca_file: str | None = Field(
        None, description="PEM file of extra trusted CAs (a private CA)."
    )

    @field_validator("host")
    @classmethod
    def _valid_host(cls, value: str) -> str:
        return check_host(value)


class MicrosoftApp(_Account):
    """An app registration in Microsoft Entra ID (Azure AD) that signs in."""

    tenant_id: str = Field(min_length=1)
    client_id: str = Field(min_length=1)
    redirect_uri: str = ""
    auth_flow: Literal["authorization_code", "client_credentials"] = (
        "client_credentials"
    )
    authority_host: str = Field(
        "https://login.microsoftonline.com", description="Azure AD endpoint."
    )
    ca_file: str | None = None
    client_secret_expires_at: datetime | None = Field(
        None,
        description=(
            "When the client secret expires (Azure portal, Certificates & "
            "secrets), so operators are warned before polling stops."
        ),
    )

    @field_validator("tenant_id", "client_id")
    @classmethod
    def _no_padding(cls, value: str) -> str:
        if value != value.strip():
            raise ValueError(
                "has leading or trailing white space; paste it again without it"
            )
        return value


class GraphAccount(MicrosoftApp):
    type: Literal["graph"] = "graph"
    mailbox: str = Field(min_length=3)
    graph_url: str = Field("https://graph.microsoft.com/v1.0")
    processed_folder: str = Field(
        "", description="Folder processed mail is moved to; empty marks it read."
    )


class MicrosoftLogin(MicrosoftApp):
    """XOAUTH2 with tokens from Microsoft's identity platform, renewed by Mailroom.

    The client secret and, for the authorization-code flow, the refresh token
    are the channel's ``client_secret`` and ``refresh_token`` secrets, shared
    with any Exchange Online (Graph) account of the same channel.
    """

    provider: Literal["microsoft"] = "microsoft"


class TokenLogin(_Account):
    """XOAUTH2 with an access token kept in the account's secret.

    For providers Mailroom cannot sign in to itself: whatever issues the
    token stores each new one through the API before the old one expires.
    """

    provider: Literal["token"] = "token"


OAuth2Login = Annotated[MicrosoftLogin | TokenLogin, Field(discriminator="provider")]
OAUTH2_DESCRIPTION = (
    "Sign in with SASL XOAUTH2 instead of the password; the user name is the "
    "mailbox the token is for."
)


class ImapAccount(_ServerAccount):
    type: Literal["imap"] = "imap"
    folder: str = "INBOX"
    idle: bool = Field(True, description="Use IMAP IDLE where the server has it.")
    oauth2: OAuth2Login | None = Field(None, description=OAUTH2_DESCRIPTION)


class Pop3Account(_ServerAccount):
    type: Literal["pop3"] = "pop3"
    oauth2: OAuth2Login | None = Field(None, description=OAUTH2_DESCRIPTION)


class SmtpAccount(_ServerAccount):
    type: Literal["smtp"] = "smtp"
    port: int = Field(587, ge=1, le=65535)
    security: Security = Security.STARTTLS
    username: str = Field(
        "",
        description=(
            "Login name; leave it empty, with no password stored, for a relay "
            "that takes mail without AUTH."
        ),
    )
    oauth2: OAuth2Login | None = Field(None, description=OAUTH2_DESCRIPTION)

    @model_validator(mode="after")
    def _token_needs_a_user(self) -> SmtpAccount:
        if self.oauth2 is not None and not self.username.strip():
            raise ValueError(
                "username: XOAUTH2 needs the mailbox the token is for as the username"
            )
        return self


InboundAccount = Annotated[
    ImapAccount | Pop3Account | GraphAccount, Field(discriminator="type")
]
OutboundAccount = Annotated[SmtpAccount | GraphAccount, Field(discriminator="type")]


class InboundHolder(BaseModel):
    account: InboundAccount


class OutboundHolder(BaseModel):
    account: OutboundAccount


def parse_inbound(data: dict[str, object]) -> ImapAccount | Pop3Account | GraphAccount:
    return InboundHolder.model_validate({"account": data}).account


def parse_outbound(data: dict[str, object]) -> SmtpAccount | GraphAccount:
    return OutboundHolder.model_validate({"account": data}).account
