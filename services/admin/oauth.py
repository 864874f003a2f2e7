"""The "save and authorise" step: a channel signs in to Microsoft as a person.

For the authorization-code flow an administrator opens ``authorization_url``,
signs in at Microsoft, and comes back to the channel's redirect URI with a
code; ``redeem_code`` trades it for a refresh token, which the caller stores
encrypted with the other secrets. What Azure AD refuses comes back as a
``ValidationFailed`` naming the setting to fix, in plain words.

One channel has one refresh token: its Exchange Online (Graph) accounts and
its IMAP and SMTP accounts that sign in with Microsoft (XOAUTH2) share it, so
they must use the same app registration. ``channel_sign_in`` finds that
registration and every permission the channel's accounts need.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from secrets import token_hex
from typing import Any

from shared.accounts import (
    GraphAccount,
    ImapAccount,
    MicrosoftApp,
    MicrosoftLogin,
    Pop3Account,
    SmtpAccount,
)
from shared.catalog import Catalog, Channel
from shared.errors import ChannelAuthError, ValidationFailed
from shared.oauth import (
    GRAPH_SCOPES,
    IMAP_SCOPES,
    POP3_SCOPES,
    SMTP_SCOPES,
    HttpSession,
    Scopes,
    TokenSource,
    sign_in_problem,
)

MAIL_SCOPES: dict[type, Scopes] = {
    ImapAccount: IMAP_SCOPES,
    Pop3Account: POP3_SCOPES,
    SmtpAccount: SMTP_SCOPES,
}
# Time allowed for each request to Azure AD while an administrator waits.
TIMEOUT_SECONDS = 30.0
# How long an administrator has to sign in once the sign-in is started.
STATE_MAX_AGE_SECONDS = 15 * 60


@dataclass(frozen=True)
class SignIn:
    """The app registration a channel signs in with, and what it asks for."""

    app: MicrosoftApp
    scopes: Scopes

    @property
    def first_resource(self) -> list[str]:
        """The scopes of one API: Azure AD issues a token for one at a time.

        The other APIs' permissions are consented to in the same sign-in, and
        the refresh token then gets their tokens too.
        """
        resource = self.scopes.delegated[0].rsplit("/", 1)[0]
        return [s for s in self.scopes.delegated if s.startswith(resource)]


def channel_sign_in(channel: Channel) -> SignIn:
    """What "save and authorise" signs in with for this channel."""
    found: list[tuple[str, MicrosoftApp, Scopes]] = []
    accounts: list[tuple[str, Any]] = [
        ("inbound", channel.inbound),
        ("outbound", channel.outbound),
    ]
    for direction, account in accounts:
        if isinstance(account, GraphAccount):
            found.append((direction, account, GRAPH_SCOPES))
        elif isinstance(account, ImapAccount | Pop3Account | SmtpAccount) and (
            isinstance(account.oauth2, MicrosoftLogin)
        ):
            found.append((direction, account.oauth2, MAIL_SCOPES[type(account)]))

    delegated = [item for item in found if item[1].auth_flow == "authorization_code"]
    if not found:
        raise ValidationFailed(
            "authorisation",
            "no account of this channel signs in with Microsoft, so there is "
            "nothing to authorise: Save and authorise is for Exchange Online "
            "accounts, and IMAP, POP3 or SMTP accounts with oauth2 provider "
            "'microsoft'",
        )
    if not delegated:
        raise ValidationFailed(
            "auth_flow",
            "no account of this channel signs in to Microsoft as a person "
            "(authorization code); client-credential accounts need admin consent "
            "in the Azure portal instead",
        )

    _, app, _ = delegated[0]
    for direction, other, _ in delegated[1:]:
        if (other.tenant_id, other.client_id) != (app.tenant_id, app.client_id):
            raise ValidationFailed(
                f"{direction}.client_id",
                "the inbound and outbound accounts sign in with different app "
                "registrations, but a channel keeps one sign-in: use the same "
                "tenant and client ID for both",
            )

    requested: list[str] = []
    for _, _, scopes in delegated:
        requested += [s for s in scopes.delegated if s not in requested]
    permissions = " and ".join(scopes.permissions for _, _, scopes in delegated)
    return SignIn(app, Scopes((), tuple(requested), permissions))


def authorization_url(
    account: MicrosoftApp,
    secrets: Mapping[str, str],
    state: str,
    scopes: Sequence[str] = GRAPH_SCOPES.delegated,
) -> str:
    """Where to send the administrator to sign in and consent.

    ``state`` comes back with the code; check it to know the answer belongs
    to this request.
    """
    _check_settings(account, secrets)
    source, http = _source(account, secrets)
    try:
        app = _application(source)
        # msal prefers its auth-code-flow helpers, which keep PKCE state
        # between the two halves; the code is redeemed with the client secret
        # here, so the plain request needs no state kept between them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            url: str = app.get_authorization_request_url(
                list(scopes),
                state=state,
                redirect_uri=account.redirect_uri,
                prompt="select_account",
            )
    finally:
        http.close()
    return url


def redeem_code(
    account: MicrosoftApp,
    secrets: Mapping[str, str],
    code: str,
    scopes: Sequence[str] = GRAPH_SCOPES.delegated,
) -> dict[str, str]:
    """The secrets with the refresh token that the code was traded for."""
    _check_settings(account, secrets)
    if not code.strip():
        raise ValidationFailed("code", "Microsoft sent no code back; sign in again")

    source, http = _source(account, secrets)
    try:
        app = _application(source)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            result = app.acquire_token_by_authorization_code(
                code.strip(), list(scopes), redirect_uri=account.redirect_uri
            )
    finally:
        http.close()

    if "access_token" not in result:
        problem = source.problem(result)
        raise ValidationFailed(problem.field or "authorisation", problem.text)
    if not result.get("refresh_token"):
        raise ValidationFailed(
            "authorisation",
            "Microsoft signed in but gave no refresh token, so Mailroom could not "
            "stay signed in: allow the offline_access permission and authorise "
            "again",
        )

    source.keep(result)
    return source.updated_secrets


def seal_state(catalog: Catalog, channel_id: int, by: str) -> str:
    """The ``state`` of a sign-in: which channel, who started it, and when."""
    started = {"channel_id": channel_id, "by": by, "nonce": token_hex(8)}
    return catalog.box.seal_text(json.dumps(started))


def open_state(catalog: Catalog, state: str) -> tuple[int, str] | None:
    """The channel and administrator of a ``state``; None if forged or stale."""
    opened = catalog.box.open_text(state, max_age_seconds=STATE_MAX_AGE_SECONDS)
    if opened is None:
        return None
    started = json.loads(opened)
    return int(started["channel_id"]), str(started["by"])


def store_sign_in(
    catalog: Catalog, channel_id: int, code: str, error: str, error_description: str
) -> str:
    """Redeem the code Microsoft sent back and keep the refresh token.

    Returns the channel's name; Microsoft's refusal becomes ValidationFailed.
    """
    channel = catalog.channel(channel_id)
    sign_in = channel_sign_in(channel)
    if error:
        problem = sign_in_problem(
            sign_in.app,
            error,
            error_description,
            padded_secret=False,
            permissions=sign_in.scopes.permissions,
        )
        raise ValidationFailed(problem.field or "authorisation", problem.text)

    updated = redeem_code(
        sign_in.app, catalog.secrets(channel.id), code, sign_in.first_resource
    )
    catalog.update_channel(
        channel.id, secrets={"refresh_token": updated["refresh_token"]}
    )
    return channel.name


def _source(
    account: MicrosoftApp, secrets: Mapping[str, str]
) -> tuple[TokenSource, HttpSession]:
    http = HttpSession(TIMEOUT_SECONDS, account.ca_file or True)
    return TokenSource(account, secrets, GRAPH_SCOPES, http=http), http


def _check_settings(account: MicrosoftApp, secrets: Mapping[str, str]) -> None:
    """Catch what Azure AD would refuse in words less clear than these."""
    if account.auth_flow != "authorization_code":
        raise ValidationFailed(
            "auth_flow",
            "only channels that sign in as a person (authorization code) are "
            "authorised; client-credential channels need admin consent instead",
        )

    values = {
        "tenant_id": account.tenant_id,
        "client_id": account.client_id,
        "redirect_uri": account.redirect_uri,
        "client_secret": secrets.get("client_secret", ""),
    }
    for field, value in values.items():
        if not value.strip():
            raise ValidationFailed(field, "is empty; copy it from the app registration")
        if value != value.strip():
            raise ValidationFailed(
                field, "has white space at its start or end; paste it again without it"
            )

    if not account.redirect_uri.startswith(("https://", "http://localhost")):
        raise ValidationFailed(
            "redirect_uri",
            "must start with https:// (Azure AD allows http only for localhost)",
        )


def _application(source: TokenSource) -> Any:
    """The msal application; a tenant Azure AD does not know is a field error."""
    try:
        return source.application()
    except ChannelAuthError as exc:
        cause = exc.__cause__
        said = f"{cause} {cause.__context__ if cause else ''}"
        problem = sign_in_problem(source.account, "", said, padded_secret=False)
        raise ValidationFailed(problem.field or "authority_host", str(exc)) from exc
