"""Console sign-in: an API token traded for a session cookie, and sign-out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status

from services.admin.context import SESSION_COOKIE, Connection, Reader, cookie_scheme
from services.admin.schemas import ErrorOut, SessionIn, WhoAmI
from services.admin.tokens import SESSION_HOURS, TokenStore

router = APIRouter(prefix="/api/session", tags=["session"])


@router.post("", response_model=WhoAmI, responses={401: {"model": ErrorOut}})
def sign_in(
    body: SessionIn, request: Request, response: Response, conn: Connection
) -> WhoAmI:
    """Open a console session with an API token; the cookie carries it."""
    opened = TokenStore(conn).open_session(body.token.get_secret_value())
    if opened is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "that token is not valid or was revoked; ask for a new one "
            "(`mailroom token create`)",
        )

    principal, session = opened
    request.state.principal = principal
    response.set_cookie(
        SESSION_COOKIE,
        session,
        max_age=SESSION_HOURS * 3600,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return WhoAmI(name=principal.name, role=principal.role.value)


@router.get("", response_model=WhoAmI, responses={401: {"model": ErrorOut}})
def who_am_i(principal: Reader) -> WhoAmI:
    """The token (or the console session's token) in use, and its role."""
    return WhoAmI(name=principal.name, role=principal.role.value)


@router.delete("", status_code=status.HTTP_204_NO_CONTENT)
def sign_out(
    response: Response,
    conn: Connection,
    session: Annotated[str | None, Depends(cookie_scheme)],
) -> None:
    """End the console session; harmless without one."""
    if session:
        TokenStore(conn).close_session(session)
    response.delete_cookie(SESSION_COOKIE, path="/")
