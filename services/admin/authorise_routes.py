"""Save and authorise: a channel signs in to Microsoft as a person.

``POST /api/channels/{id}/authorise`` answers the Microsoft sign-in address
to open. Microsoft sends the browser back to the channel's redirect URI,
which is ``GET /api/oauth/callback`` of this API; it trades the code for a
refresh token and stores it encrypted with the channel's other secrets.

The callback needs no API token: it is reached by a browser coming back
from Microsoft. What proves the answer belongs to a sign-in an administrator
started is ``state``, sealed with the secret keys and valid for 15 minutes.
"""

from __future__ import annotations

import html

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from services.admin.context import Admin, CatalogDep
from services.admin.oauth import (
    STATE_MAX_AGE_SECONDS,
    authorization_url,
    channel_sign_in,
    open_state,
    seal_state,
    store_sign_in,
)
from services.admin.schemas import ErrorOut
from shared.errors import NotFoundError, ValidationFailed
from shared.logs import get_logger

CALLBACK_PATH = "/api/oauth/callback"

router = APIRouter(tags=["channels"])
log = get_logger(__name__)


class AuthoriseOut(BaseModel):
    authorization_url: str = Field(description="Open it in a browser to sign in.")
    redirect_uri: str = Field(
        description=f"Where Microsoft sends the browser back: {CALLBACK_PATH} here."
    )
    expires_in_seconds: int = STATE_MAX_AGE_SECONDS


@router.post(
    "/api/channels/{channel_id}/authorise",
    response_model=AuthoriseOut,
    responses={422: {"model": ErrorOut, "description": "Nothing to authorise."}},
)
def start_authorisation(
    channel_id: int, who: Admin, catalog: CatalogDep
) -> AuthoriseOut:
    """Start signing in to Microsoft for the channel's delegated accounts."""
    channel = catalog.channel(channel_id)
    sign_in = channel_sign_in(channel)
    state = seal_state(catalog, channel.id, who.name)
    url = authorization_url(
        sign_in.app, catalog.secrets(channel.id), state, sign_in.scopes.delegated
    )
    log.info("channel authorisation started", channel_id=channel.id, by=who.name)
    return AuthoriseOut(authorization_url=url, redirect_uri=sign_in.app.redirect_uri)


@router.get(CALLBACK_PATH, response_class=HTMLResponse)
def finish_authorisation(
    catalog: CatalogDep,
    state: str = "",
    code: str = "",
    error: str = "",
    error_description: str = "",
) -> HTMLResponse:
    """Where Microsoft sends the administrator's browser back with a code."""
    started = open_state(catalog, state)
    if started is None:
        return _page(
            400,
            "This sign-in cannot be finished",
            "The link is not one Mailroom made, or it is older than 15 minutes. "
            "Start again with Save and authorise.",
        )
    channel_id, by = started

    try:
        name = store_sign_in(catalog, channel_id, code, error, error_description)
    except (ValidationFailed, NotFoundError) as exc:
        log.warning(
            "channel authorisation failed",
            channel_id=channel_id,
            by=by,
            error=str(exc),
        )
        text = exc.message if isinstance(exc, ValidationFailed) else str(exc)
        return _page(400, "Microsoft did not authorise the channel", text)

    log.info("channel authorised", channel_id=channel_id, by=by)
    return _page(
        200,
        f"Channel {name} is authorised",
        "Mailroom keeps the sign-in and renews it. You can close this page.",
    )


def _page(status: int, title: str, text: str) -> HTMLResponse:
    body = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>"
        "<p><a href='/'>Back to the console</a></p></body></html>"
    )
    return HTMLResponse(body, status_code=status)
