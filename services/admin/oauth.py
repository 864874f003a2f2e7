"""The "save and authorise" step: a channel signs in to Exchange as a person.

For the authorization-code flow an administrator opens ``authorization_url``,
signs in at Microsoft, and comes back to the channel's redirect URI with a
code; ``redeem_code`` trades it for a refresh token, which the caller stores
encrypted with the other secrets. What Azure AD refuses comes back as a
``ValidationFailed`` naming the setting to fix, in plain words.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from services.poller.graph import DELEGATED_SCOPES, GraphClient, sign_in_problem
from shared.accounts import GraphAccount
from shared.errors import ChannelAuthError, ValidationFailed

# Time allowed for each request to Azure AD while an administrator waits.
TIMEOUT_SECONDS = 30.0


def authorization_url(
    account: GraphAccount, secrets: Mapping[str, str], state: str
) -> str:
    """Where to send the administrator to sign in and consent.

    ``state`` comes back with the code; check it to know the answer belongs
    to this request.
    """
    _check_settings(account, secrets)
    client = GraphClient(account, secrets, timeout=TIMEOUT_SECONDS)
    try:
        app = _application(client)
        # msal prefers its auth-code-flow helpers, which keep PKCE state
        # between the two halves; the code is redeemed with the client secret
        # here, so the plain request needs no state kept between them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            url: str = app.get_authorization_request_url(
                DELEGATED_SCOPES,
                state=state,
                redirect_uri=account.redirect_uri,
                prompt="select_account",
            )
    finally:
        client.close()
    return url


def redeem_code(
    account: GraphAccount, secrets: Mapping[str, str], code: str
) -> dict[str, str]:
    """The secrets with the refresh token that the code was traded for."""
    _check_settings(account, secrets)
    if not code.strip():
        raise ValidationFailed("code", "Microsoft sent no code back; sign in again")

    client = GraphClient(account, secrets, timeout=TIMEOUT_SECONDS)
    try:
        app = _application(client)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            result = app.acquire_token_by_authorization_code(
                code.strip(), DELEGATED_SCOPES, redirect_uri=account.redirect_uri
            )
    finally:
        client.close()

    if "access_token" not in result:
        problem = client.problem(result)
        raise ValidationFailed(problem.field or "authorisation", problem.text)
    if not result.get("refresh_token"):
        raise ValidationFailed(
            "authorisation",
            "Microsoft signed in but gave no refresh token, so Mailroom could not "
            "stay signed in: allow the offline_access permission and authorise "
            "again",
        )

    client.keep(result)
    return client.updated_secrets


def _check_settings(account: GraphAccount, secrets: Mapping[str, str]) -> None:
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


def _application(client: GraphClient) -> Any:
    """The msal application; a tenant Azure AD does not know is a field error."""
    try:
        return client.application()
    except ChannelAuthError as exc:
        cause = exc.__cause__
        said = f"{cause} {cause.__context__ if cause else ''}"
        problem = sign_in_problem(client.account, "", said, padded_secret=False)
        raise ValidationFailed(problem.field or "authority_host", str(exc)) from exc
