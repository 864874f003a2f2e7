"""The Azure AD half of the HTTPS fake: app registrations, sign-in and tokens.

Serves OpenID discovery, ``/{tenant}/oauth2/v2.0/authorize`` (redirecting
back with a code) and ``/{tenant}/oauth2/v2.0/token`` for client
credentials, authorization codes and refresh tokens, answering errors in
Microsoft's JSON shape with the AADSTS codes real tenants give. Tokens are
issued for one API at a time: Microsoft Graph, or Exchange Online's IMAP,
POP and SMTP (``outlook``), whose servers check them with ``mail_token_valid``
or, for Dovecot, by RFC 7662 introspection (``/_exchange/introspect``, a test
bridge, not a Microsoft endpoint).

``GraphFake`` (``tests.support.graph_fake``) is this plus the Graph mailboxes
and the server.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
GRAPH_RESOURCE = "https://graph.microsoft.com/"
# Exchange Online's IMAP, POP and SMTP: delegated scopes name the first,
# app-only tokens ask for the second.
OUTLOOK_RESOURCE = "https://outlook.office.com/"
OUTLOOK_SCOPE = "https://outlook.office365.com/.default"
RESOURCES = {GRAPH_RESOURCE: "graph", OUTLOOK_RESOURCE: "outlook"}
SIGN_IN_SCOPES = frozenset({"openid", "profile", "offline_access", "email"})


def _b64url(data: dict[str, Any]) -> str:
    raw = json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@dataclass
class RegisteredApp:
    tenant: str
    client_id: str
    secret: str
    redirect_uris: list[str] = field(default_factory=list)
    permissions: set[str] = field(default_factory=lambda: {"Mail.ReadWrite"})
    consented: bool = True
    secret_expired: bool = False
    name: str = "Mailroom"


@dataclass
class IssuedToken:
    app: RegisteredApp
    permissions: frozenset[str]
    expires_at: float
    user: str | None
    resource: str = "graph"  # who the token is for: "graph" or "outlook"


@dataclass
class Grant:
    """An authorization code or refresh token and what it was issued for."""

    app: RegisteredApp
    user: str
    scopes: list[str]
    redirect_uri: str = ""
    expires_at: float = 0.0


class AadError(Exception):
    """A token endpoint error in Azure AD's documented JSON shape."""

    def __init__(self, status: int, error: str, code: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.error = error
        self.code = code
        self.text = text


def _one_resource(requested: list[str]) -> tuple[str, list[str]]:
    """The API a token request is for; Azure AD issues a token for one only."""
    wanted = [s for s in requested if s not in SIGN_IN_SCOPES]
    found = {r for r in RESOURCES for s in wanted if s.startswith(r)}
    if len(found) > 1:
        raise AadError(
            400,
            "invalid_scope",
            28000,
            "Provided value for the input parameter scope is not valid because it "
            "contains more than one resource. Scope "
            f"{' '.join(requested)} is not valid.",
        )
    resource = found.pop() if found else GRAPH_RESOURCE
    return resource, [s for s in wanted if s.startswith(resource)]


class AzureAd:
    """Azure AD's state and answers; ``GraphFake`` adds Graph and the server."""

    lock: Any
    url: str

    def _init_azure_ad(self) -> None:
        self.apps: dict[tuple[str, str], RegisteredApp] = {}
        self.tenants: set[str] = set()
        self.tokens: dict[str, IssuedToken] = {}
        self.codes: dict[str, Grant] = {}
        self.refresh_tokens: dict[str, Grant] = {}
        self.token_lifetime = 3599
        self.signed_in_user = "agent@contoso.example"

    def register_app(
        self,
        tenant: str,
        client_id: str,
        secret: str,
        *,
        redirect_uris: tuple[str, ...] = (),
        permissions: tuple[str, ...] = ("Mail.ReadWrite", "Mail.Send"),
        consented: bool = True,
    ) -> RegisteredApp:
        app = RegisteredApp(
            tenant, client_id, secret, list(redirect_uris), set(permissions), consented
        )
        with self.lock:
            self.tenants.add(tenant)
            self.apps[(tenant, client_id)] = app
        return app

    def expire_tokens(self) -> None:
        """Make every access token issued so far expired, as if time passed."""
        with self.lock:
            for token in self.tokens.values():
                token.expires_at = 0.0

    def expire_refresh_tokens(self) -> None:
        with self.lock:
            for grant in self.refresh_tokens.values():
                grant.expires_at = 0.0

    def openid_configuration(self, tenant: str) -> dict[str, Any]:
        if tenant not in self.tenants:
            raise AadError(
                400,
                "invalid_tenant",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the "
                "correct tenant ID and are signing into the correct cloud. Check "
                "with your subscription administrator, this may happen if there "
                "are no active subscriptions for the tenant.",
            )
        base = f"{self.url}/{tenant}"
        return {
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "issuer": f"{self.url}/{tenant}/v2.0",
            "response_types_supported": ["code", "id_token", "code id_token"],
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "client_secret_basic",
            ],
            "tenant_region_scope": "EU",
        }

    def _app(self, tenant: str, client_id: str) -> RegisteredApp:
        if tenant not in self.tenants:
            raise AadError(
                400,
                "invalid_request",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the "
                "correct tenant ID and are signing into the correct cloud.",
            )
        app = self.apps.get((tenant, client_id))
        if app is None:
            raise AadError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the "
                f"directory '{tenant}'. This can happen if the application has not "
                "been installed by the administrator of the tenant or consented to "
                "by any user in the tenant. You may have sent your authentication "
                "request to the wrong tenant.",
            )
        return app

    def authorize(self, tenant: str, query: dict[str, str]) -> str:
        """The redirect for a sign-in that the user completes at once."""
        app = self._app(tenant, query.get("client_id", ""))
        redirect_uri = query.get("redirect_uri", "")
        if redirect_uri not in app.redirect_uris:
            raise AadError(
                400,
                "invalid_request",
                50011,
                f"The redirect URI '{redirect_uri}' specified in the request does "
                "not match the redirect URIs configured for the application "
                f"'{app.client_id}'. Make sure the redirect URI sent in the request "
                "matches one added to your application in the Azure portal.",
            )
        if query.get("response_type") != "code":
            raise AadError(
                400, "unsupported_response_type", 70001, "Only code is supported."
            )

        code = secrets.token_urlsafe(32)
        self.codes[code] = Grant(
            app,
            self.signed_in_user,
            query.get("scope", "").split(),
            redirect_uri,
            time.time() + 600,
        )
        params = {"code": code, "session_state": str(uuid.uuid4())}
        if "state" in query:
            params["state"] = query["state"]
        return f"{redirect_uri}?{urlencode(params)}"

    def token(
        self, tenant: str, form: dict[str, str], basic: tuple[str, str] | None
    ) -> dict[str, Any]:
        client_id = form.get("client_id") or (basic[0] if basic else "")
        app = self._app(tenant, client_id)
        secret = form.get("client_secret") or (basic[1] if basic else None)
        if not secret:
            raise AadError(
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: "
                "'client_assertion' or 'client_secret'.",
            )
        if secret != app.secret:
            raise AadError(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in "
                "the request is the client secret value, not the client secret ID, "
                f"for a secret added to app '{app.client_id}'.",
            )
        if app.secret_expired:
            raise AadError(
                401,
                "invalid_client",
                7000222,
                f"The provided client secret keys for app '{app.client_id}' are "
                "expired. Visit the Azure portal to create new keys for your app.",
            )

        grant_type = form.get("grant_type", "")
        if grant_type == "client_credentials":
            return self._client_credentials(app, form.get("scope", ""))
        if grant_type == "authorization_code":
            grant = self._redeem_code(app, form)
        elif grant_type == "refresh_token":
            grant = self._redeem_refresh_token(app, form.get("refresh_token", ""))
        else:
            raise AadError(
                400,
                "unsupported_grant_type",
                70003,
                f"The app requested an unsupported grant type '{grant_type}'.",
            )
        return self._delegated(app, grant, form.get("scope", "").split())

    def _client_credentials(self, app: RegisteredApp, scope: str) -> dict[str, Any]:
        if scope not in (GRAPH_SCOPE, OUTLOOK_SCOPE):
            raise AadError(
                400,
                "invalid_scope",
                1002012,
                f"The provided value for scope {scope} is not valid. Client "
                "credential flows must have a scope value with /.default suffixed "
                "to the resource identifier (application ID URI).",
            )
        resource = "graph" if scope == GRAPH_SCOPE else "outlook"
        access = self._issue(app, frozenset(app.permissions), None, resource)
        return {
            "token_type": "Bearer",
            "expires_in": self.token_lifetime,
            "ext_expires_in": self.token_lifetime,
            "access_token": access,
        }

    def _redeem_code(self, app: RegisteredApp, form: dict[str, str]) -> Grant:
        grant = self.codes.pop(form.get("code", ""), None)
        if grant is None or grant.app is not app or grant.expires_at < time.time():
            raise AadError(
                400,
                "invalid_grant",
                70008,
                "The provided authorization code or refresh token has expired due "
                "to inactivity. Send a new interactive authorization request for "
                "this user and resource.",
            )
        redirect_uri = form.get("redirect_uri", "")
        if redirect_uri != grant.redirect_uri or redirect_uri not in app.redirect_uris:
            raise AadError(
                400,
                "invalid_grant",
                50011,
                f"The redirect URI '{redirect_uri}' specified in the request does "
                "not match the redirect URIs configured for the application "
                f"'{app.client_id}'. Make sure the redirect URI sent in the request "
                "matches one added to your application in the Azure portal.",
            )
        return grant

    def _redeem_refresh_token(self, app: RegisteredApp, token: str) -> Grant:
        grant = self.refresh_tokens.pop(token, None)
        if grant is None or grant.app is not app or grant.expires_at < time.time():
            issued = datetime.now(UTC) - timedelta(days=91)
            raise AadError(
                400,
                "invalid_grant",
                700082,
                "The refresh token has expired due to inactivity. The token was "
                f"issued on {issued:%Y-%m-%dT%H:%M:%S}Z and was inactive for "
                "90.00:00:00.",
            )
        return grant

    def _delegated(
        self, app: RegisteredApp, grant: Grant, requested: list[str]
    ) -> dict[str, Any]:
        if not app.consented:
            raise AadError(
                400,
                "invalid_grant",
                65001,
                "The user or administrator has not consented to use the "
                f"application with ID '{app.client_id}' named '{app.name}'. Send an "
                "interactive authorization request for this user and resource.",
            )

        resource, scopes = _one_resource(requested)
        names = {s.removeprefix(resource).removesuffix(".Shared") for s in scopes}
        access = self._issue(
            app, frozenset(names & app.permissions), grant.user, RESOURCES[resource]
        )
        result: dict[str, Any] = {
            "token_type": "Bearer",
            "scope": " ".join(scopes),
            "expires_in": self.token_lifetime,
            "ext_expires_in": self.token_lifetime,
            "access_token": access,
        }
        if "offline_access" in requested:
            refresh = secrets.token_urlsafe(48)
            self.refresh_tokens[refresh] = Grant(
                app, grant.user, requested, expires_at=time.time() + 90 * 86400
            )
            result["refresh_token"] = refresh
        if "openid" in requested:
            oid = str(uuid.uuid5(uuid.NAMESPACE_URL, grant.user))
            now = int(time.time())
            claims = {
                "iss": f"{self.url}/{app.tenant}/v2.0",
                "aud": app.client_id,
                "sub": oid,
                "oid": oid,
                "tid": app.tenant,
                "iat": now,
                "nbf": now,
                "exp": now + 3600,
                "preferred_username": grant.user,
            }
            result["id_token"] = f"{_b64url({'alg': 'none'})}.{_b64url(claims)}."
            result["client_info"] = _b64url({"uid": oid, "utid": app.tenant})
        return result

    def _issue(
        self,
        app: RegisteredApp,
        permissions: frozenset[str],
        user: str | None,
        resource: str = "graph",
    ) -> str:
        value = secrets.token_urlsafe(48)
        expires_at = time.time() + self.token_lifetime
        self.tokens[value] = IssuedToken(app, permissions, expires_at, user, resource)
        return value

    def mail_token_valid(self, user: str, token: str, needs: str) -> bool:
        """Whether Exchange would take ``token`` for ``user``'s mailbox.

        A delegated token must carry permission ``needs`` (IMAP.AccessAsUser.All,
        SMTP.Send) and be for ``user``; an app-only one, the app's permission
        (IMAP.AccessAsApp, SMTP.SendAsApp).
        """
        with self.lock:
            issued = self.tokens.get(token)
            if issued is None or issued.resource != "outlook":
                return False
            if issued.expires_at <= time.time():
                return False
            if issued.user is None:
                app_permission = needs.replace("AccessAsUser.All", "AccessAsApp")
                return app_permission.replace(".Send", ".SendAsApp") in (
                    issued.permissions
                )
            return needs in issued.permissions and issued.user == user.lower()

    def introspect(self, token: str) -> dict[str, Any]:
        """RFC 7662 token introspection, for Dovecot's oauth2 passdb.

        Not an Azure AD endpoint: it stands in for Exchange's own check of
        the tokens its IMAP and POP3 servers take.
        """
        with self.lock:
            issued = self.tokens.get(token)
            active = (
                issued is not None
                and issued.resource == "outlook"
                and issued.user is not None
                and issued.expires_at > time.time()
                and bool(
                    {"IMAP.AccessAsUser.All", "POP.AccessAsUser.All"}
                    & issued.permissions
                )
            )
        if not active or issued is None:
            return {"active": False}
        return {"active": True, "username": issued.user, "scope": "IMAP POP"}


class AzureAdRoutes:
    """The HTTP handler's Azure AD routes; the handler provides the rest."""

    fake: Any
    body: bytes
    query: dict[str, str]
    headers: Any

    def _aad_fail(self, exc: AadError) -> None:
        trace, correlation = uuid.uuid4(), uuid.uuid4()
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        self._json(
            exc.status,
            {
                "error": exc.error,
                "error_description": (
                    f"AADSTS{exc.code}: {exc.text}\r\nTrace ID: {trace}\r\n"
                    f"Correlation ID: {correlation}\r\nTimestamp: {stamp}"
                ),
                "error_codes": [exc.code],
                "timestamp": stamp,
                "trace_id": str(trace),
                "correlation_id": str(correlation),
                "error_uri": f"{self.fake.url}/error?code={exc.code}",
            },
        )

    def _oidc(self, tenant: str) -> None:
        self._json(200, self.fake.openid_configuration(tenant))

    def _authorize(self, tenant: str) -> None:
        try:
            location = self.fake.authorize(tenant, self.query)
        except AadError as exc:
            # Azure AD shows these on its own sign-in page; it never redirects
            # to a URI it does not trust.
            page = f"<html><body><p>AADSTS{exc.code}: {exc.text}</p></body></html>"
            self._respond(400, page.encode(), "text/html; charset=utf-8")
            return
        self._respond(302, headers={"Location": location})

    def _token(self, tenant: str) -> None:
        form = {k: v[-1] for k, v in parse_qs(self.body.decode()).items()}
        basic = None
        header = self.headers.get("Authorization", "")
        if header.startswith("Basic "):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            basic = (
                unquote(user.replace("+", " ")),
                unquote(password.replace("+", " ")),
            )
        self._json(200, self.fake.token(tenant, form, basic))

    def _introspect(self) -> None:
        form = {k: v[-1] for k, v in parse_qs(self.body.decode()).items()}
        self._json(200, self.fake.introspect(form.get("token", "")))
