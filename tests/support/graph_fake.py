"""A fake of Azure AD and Microsoft Graph mail over HTTPS on 127.0.0.1.

One threaded server plays both parts; Azure AD's (sign-in and tokens) is in
``tests.support.azure_ad_fake``. As Graph v1.0 it keeps mailboxes in memory:
folders with child folders, message delta queries paged with
``@odata.nextLink`` and ended by ``@odata.deltaLink``, ``$value`` MIME,
``isRead`` updates, moves, ``sendMail``, drafts with upload sessions, and
Graph's error JSON for expired tokens, missing permissions and throttling.

The fake is stricter than the real service in one place: a refresh token is
void once redeemed, so a client that does not keep the rotated one fails.
"""

from __future__ import annotations

import base64
import email
import email.policy
import itertools
import json
import re
import secrets
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import getaddresses
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import pytest

from shared.accounts import GraphAccount
from tests.support.azure_ad_fake import (
    AadError,
    AzureAd,
    AzureAdRoutes,
    IssuedToken,
    RegisteredApp,
)
from tests.support.tls import TestPki

HOST = "127.0.0.1"
REQUEST_LIMIT = 4 * 1024 * 1024
UPLOAD_CHUNK_LIMIT = 4 * 1024 * 1024
ATTACHMENT_LIMIT = 150 * 1024 * 1024
WELL_KNOWN = {
    "msgfolderroot": "Top of Information Store",
    "inbox": "Inbox",
    "drafts": "Drafts",
    "sentitems": "Sent Items",
    "deleteditems": "Deleted Items",
    "junkemail": "Junk Email",
    "outbox": "Outbox",
    "archive": "Archive",
}
READ = frozenset({"Mail.Read", "Mail.ReadWrite"})
WRITE = frozenset({"Mail.ReadWrite"})
SEND = frozenset({"Mail.Send"})


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _new_id() -> str:
    return "AAMk" + base64.urlsafe_b64encode(uuid.uuid4().bytes).decode()


@dataclass
class Folder:
    id: str
    display_name: str
    parent_id: str
    hidden: bool = False


@dataclass
class FileAttachment:
    name: str
    content_type: str
    data: bytes


@dataclass
class StoredMessage:
    id: str
    folder_id: str
    mime: bytes
    is_read: bool
    created_seq: int
    changed_seq: int
    received: str
    is_draft: bool = False
    attachments: list[FileAttachment] = field(default_factory=list)

    def subject(self) -> str:
        parsed = email.message_from_bytes(self.mime, policy=email.policy.default)
        return str(parsed.get("Subject", ""))


@dataclass
class SentMessage:
    """A message the fake accepted for delivery, with how it was sent."""

    mailbox: str
    mime: bytes
    recipients: list[str]
    attachments: list[FileAttachment]
    via: str  # "sendMail" or "draft"


@dataclass
class UploadSession:
    mailbox: str
    message_id: str
    name: str
    content_type: str
    size: int
    received: bytearray = field(default_factory=bytearray)


class FakeMailbox:
    """One user's mail: folders by id and messages by id."""

    def __init__(self, address: str):
        self.address = address
        self.folders: dict[str, Folder] = {}
        self.well_known: dict[str, str] = {}
        self.messages: dict[str, StoredMessage] = {}
        self.removed: list[tuple[int, str, str]] = []
        self._seq = itertools.count(1)
        self.seq = 0
        root = self._add_folder(WELL_KNOWN["msgfolderroot"], parent_id="", hidden=True)
        self.well_known["msgfolderroot"] = root.id
        for name, display in WELL_KNOWN.items():
            if name != "msgfolderroot":
                self.well_known[name] = self._add_folder(display, root.id).id

    def next_seq(self) -> int:
        self.seq = next(self._seq)
        return self.seq

    def _add_folder(self, name: str, parent_id: str, hidden: bool = False) -> Folder:
        folder = Folder(_new_id(), name, parent_id, hidden)
        self.folders[folder.id] = folder
        return folder

    def resolve(self, ref: str) -> Folder | None:
        folder_id = self.well_known.get(ref.lower(), ref)
        return self.folders.get(folder_id)

    def children(self, folder_id: str) -> list[Folder]:
        return [f for f in self.folders.values() if f.parent_id == folder_id]

    def in_folder(self, folder_id: str) -> list[StoredMessage]:
        found = [m for m in self.messages.values() if m.folder_id == folder_id]
        return sorted(found, key=lambda m: m.created_seq)

    def put(self, folder_id: str, mime: bytes, *, is_read: bool = False) -> str:
        seq = self.next_seq()
        message = StoredMessage(_new_id(), folder_id, mime, is_read, seq, seq, _now())
        self.messages[message.id] = message
        return message.id

    def remove(self, message: StoredMessage) -> None:
        del self.messages[message.id]
        self.removed.append((self.next_seq(), message.folder_id, message.id))


@dataclass
class DeltaRound:
    """One round of a delta query: its items fixed when it started."""

    mailbox: str
    folder_id: str
    change_type: str | None
    items: list[dict[str, Any]]
    end_seq: int
    select: list[str]


class GraphError(Exception):
    """An answer in Graph's error shape, raised by a route."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def _graph_error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> GraphError:
    return GraphError(status, code, message, headers)


class GraphFake(AzureAd):
    """The fake's state and scripted faults; ``start`` serves it over TLS."""

    def __init__(self, pki: TestPki):
        self.pki = pki
        self.lock = threading.RLock()
        self._init_azure_ad()
        self.mailboxes: dict[str, FakeMailbox] = {}
        self.rounds: dict[str, DeltaRound] = {}
        self.delta_tokens: dict[str, tuple[str, str, str | None, int, list[str]]] = {}
        self.uploads: dict[str, UploadSession] = {}
        self.sent: list[SentMessage] = []
        self.requests: list[tuple[str, str]] = []
        self._throttle = 0
        self._retry_after = 1
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    # Lifecycle

    @property
    def url(self) -> str:
        assert self.server is not None, "start the fake first"
        return f"https://{HOST}:{self.server.server_address[1]}"

    @property
    def graph_url(self) -> str:
        return f"{self.url}/v1.0"

    def start(self) -> GraphFake:
        context = self.pki.server_context()
        server = _Server((HOST, 0), _handler_for(self))
        server.socket = context.wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )
        self.server = server
        self.thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="graph-fake",
            daemon=True,
        )
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def __enter__(self) -> GraphFake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Set-up helpers for the tests

    def add_mailbox(self, address: str) -> FakeMailbox:
        with self.lock:
            return self.mailboxes.setdefault(address.lower(), FakeMailbox(address))

    def add_folder(
        self, mailbox: str, name: str, *, parent: str = "msgfolderroot"
    ) -> str:
        with self.lock:
            box = self._mailbox(mailbox)
            parent_folder = box.resolve(parent) or self._folder_named(box, parent)
            return box._add_folder(name, parent_folder.id).id

    def add_message(
        self, mailbox: str, folder: str, mime_bytes: bytes, *, is_read: bool = False
    ) -> str:
        """Deliver a message into a folder (a well-known name, id or display name)."""
        with self.lock:
            box = self._mailbox(mailbox)
            target = box.resolve(folder) or self._folder_named(box, folder)
            return box.put(target.id, mime_bytes, is_read=is_read)

    def delete_message(self, mailbox: str, message_id: str) -> None:
        with self.lock:
            box = self._mailbox(mailbox)
            box.remove(box.messages[message_id])

    def folder_id(self, mailbox: str, folder: str) -> str:
        with self.lock:
            box = self._mailbox(mailbox)
            return (box.resolve(folder) or self._folder_named(box, folder)).id

    def messages(self, mailbox: str, folder: str) -> list[StoredMessage]:
        with self.lock:
            return list(
                self._mailbox(mailbox).in_folder(self.folder_id(mailbox, folder))
            )

    def account(
        self, app: RegisteredApp, mailbox: str, **settings: Any
    ) -> GraphAccount:
        """A GraphAccount that signs in with ``app`` at this fake."""
        return GraphAccount(
            tenant_id=app.tenant,
            client_id=app.client_id,
            mailbox=mailbox,
            authority_host=self.url,
            graph_url=self.graph_url,
            ca_file=str(self.pki.ca_file),
            **settings,
        )

    def count(self, method: str, pattern: str) -> int:
        """Requests seen whose path matches the regular expression."""
        with self.lock:
            return sum(
                1
                for m, path in self.requests
                if m == method and re.search(pattern, path)
            )

    # Scripted faults

    def throttle_next(self, n: int, retry_after_seconds: int) -> None:
        """Answer the next ``n`` Graph requests 429 with this Retry-After."""
        with self.lock:
            self._throttle = n
            self._retry_after = retry_after_seconds

    def forget_delta_state(self) -> None:
        """Void every delta and next link, as when Exchange drops a sync state."""
        with self.lock:
            self.rounds.clear()
            self.delta_tokens.clear()

    def _mailbox(self, address: str) -> FakeMailbox:
        box = self.mailboxes.get(address.lower())
        if box is None:
            raise _graph_error(
                404, "ErrorInvalidUser", f"The requested user '{address}' is invalid."
            )
        return box

    @staticmethod
    def _folder_named(box: FakeMailbox, name: str) -> Folder:
        for folder in box.folders.values():
            if folder.display_name.lower() == name.lower():
                return folder
        raise _graph_error(
            404, "ErrorItemNotFound", "The specified object was not found in the store."
        )

    # Graph

    def authenticate(self, header: str | None, needs: frozenset[str]) -> IssuedToken:
        if not header or not header.startswith("Bearer "):
            raise _graph_error(
                401, "InvalidAuthenticationToken", "Access token is empty."
            )
        token = self.tokens.get(header.removeprefix("Bearer "))
        if token is None:
            raise _graph_error(
                401,
                "InvalidAuthenticationToken",
                "IDX14100: JWT is not well formed, there are no dots (.).",
            )
        if token.expires_at <= time.time():
            raise _graph_error(
                401,
                "InvalidAuthenticationToken",
                "Lifetime validation failed, the token is expired.",
            )
        if token.resource != "graph":
            raise _graph_error(401, "InvalidAuthenticationToken", "Invalid audience.")
        if not token.permissions & needs:
            raise _graph_error(
                403,
                "ErrorAccessDenied",
                "Access is denied. Check credentials and try again.",
            )
        return token

    def throttled(self) -> GraphError | None:
        if self._throttle <= 0:
            return None
        self._throttle -= 1
        return _graph_error(
            429,
            "ApplicationThrottled",
            "Application is over its MailboxConcurrency limit.",
            {"Retry-After": str(self._retry_after)},
        )

    def folder_json(self, box: FakeMailbox, folder: Folder) -> dict[str, Any]:
        inside = box.in_folder(folder.id)
        return {
            "id": folder.id,
            "displayName": folder.display_name,
            "parentFolderId": folder.parent_id,
            "childFolderCount": len(box.children(folder.id)),
            "unreadItemCount": sum(1 for m in inside if not m.is_read),
            "totalItemCount": len(inside),
            "isHidden": folder.hidden,
        }

    def message_json(
        self, box: FakeMailbox, message: StoredMessage, select: list[str] | None = None
    ) -> dict[str, Any]:
        full = {
            "@odata.type": "#microsoft.graph.message",
            "@odata.etag": f'W/"{message.changed_seq}"',
            "id": message.id,
            "receivedDateTime": message.received,
            "subject": message.subject(),
            "isRead": message.is_read,
            "isDraft": message.is_draft,
            "parentFolderId": message.folder_id,
            "hasAttachments": bool(message.attachments),
        }
        if not select:
            return full
        keep = {"@odata.type", "@odata.etag", "id", *select}
        return {k: v for k, v in full.items() if k in keep}

    def delta_page(
        self,
        box: FakeMailbox,
        folder: Folder,
        query: dict[str, str],
        page_size: int,
    ) -> dict[str, Any]:
        if "$skiptoken" in query:
            token = query["$skiptoken"]
            round_id, _, offset_text = token.partition(".")
            delta_round = self.rounds.get(round_id)
            if delta_round is None or delta_round.folder_id != folder.id:
                raise _graph_error(
                    410, "SyncStateNotFound", "The sync state is not valid or expired."
                )
            offset = int(offset_text)
        else:
            delta_round = self._start_round(box, folder, query)
            round_id = secrets.token_urlsafe(16)
            self.rounds[round_id] = delta_round
            offset = 0

        items = delta_round.items[offset : offset + page_size]
        link = f"{self.graph_url}/users/{quote(box.address)}/mailFolders/{folder.id}"
        page: dict[str, Any] = {
            "@odata.context": f"{self.graph_url}/$metadata#Collection(message)",
            "value": items,
        }
        if offset + page_size < len(delta_round.items):
            skip = f"{round_id}.{offset + page_size}"
            page["@odata.nextLink"] = f"{link}/messages/delta?$skiptoken={skip}"
        else:
            del self.rounds[round_id]
            delta = secrets.token_urlsafe(24)
            self.delta_tokens[delta] = (
                box.address.lower(),
                folder.id,
                delta_round.change_type,
                delta_round.end_seq,
                delta_round.select,
            )
            page["@odata.deltaLink"] = f"{link}/messages/delta?$deltatoken={delta}"
        return page

    def _start_round(
        self, box: FakeMailbox, folder: Folder, query: dict[str, str]
    ) -> DeltaRound:
        if "$deltatoken" in query:
            state = self.delta_tokens.get(query["$deltatoken"])
            if state is None or state[1] != folder.id:
                raise _graph_error(
                    410, "SyncStateNotFound", "The sync state is not valid or expired."
                )
            _, _, change_type, since, select = state
        else:
            change_type = query.get("changeType")
            since = -1
            select = [s for s in query.get("$select", "").split(",") if s]
        if change_type not in (None, "created", "updated", "deleted"):
            raise _graph_error(
                400,
                "ErrorInvalidUrlQuery",
                f"The value '{change_type}' of changeType is not supported.",
            )

        items: list[dict[str, Any]] = []
        for message in box.in_folder(folder.id):
            created = message.created_seq > since
            updated = not created and message.changed_seq > since
            if (created and change_type in (None, "created")) or (
                updated and change_type in (None, "updated")
            ):
                items.append(self.message_json(box, message, select))
        if since >= 0 and change_type in (None, "deleted"):
            for seq, folder_id, message_id in box.removed:
                if seq > since and folder_id == folder.id:
                    items.append(
                        {
                            "@odata.type": "#microsoft.graph.message",
                            "id": message_id,
                            "@removed": {"reason": "deleted"},
                        }
                    )
        return DeltaRound(box.address, folder.id, change_type, items, box.seq, select)

    def send_mime(self, box: FakeMailbox, body: bytes) -> None:
        mime = _decode_mime(body)
        self.sent.append(
            SentMessage(box.address, mime, _recipients(mime), [], "sendMail")
        )
        box.put(box.well_known["sentitems"], mime, is_read=True)

    def upload(
        self, session_id: str, content_range: str, body: bytes
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        session = self.uploads.get(session_id)
        if session is None:
            raise _graph_error(
                404, "ErrorItemNotFound", "The upload session does not exist."
            )
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", content_range or "")
        if match is None:
            raise _graph_error(
                400, "InvalidRequest", "Content-Range is missing or malformed."
            )
        start, end, total = (int(g) for g in match.groups())
        if (
            start != len(session.received)
            or end - start + 1 != len(body)
            or total != session.size
            or len(body) > UPLOAD_CHUNK_LIMIT
        ):
            raise _graph_error(
                416,
                "InvalidRange",
                f"The range {content_range} of {len(body)} bytes does not continue "
                f"at byte {len(session.received)} of {session.size}.",
            )

        session.received.extend(body)
        if len(session.received) < session.size:
            return (
                200,
                {
                    "expirationDateTime": _expiry(),
                    "nextExpectedRanges": [str(len(session.received))],
                },
                {},
            )

        del self.uploads[session_id]
        box = self._mailbox(session.mailbox)
        message = box.messages[session.message_id]
        message.attachments.append(
            FileAttachment(session.name, session.content_type, bytes(session.received))
        )
        attachment_id = _new_id()
        location = (
            f"{self.url}/api/v2.0/Users('{quote(box.address)}')/Messages"
            f"('{message.id}')/Attachments('{attachment_id}')"
        )
        return 201, {}, {"Location": location}


def _expiry() -> str:
    return (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _decode_mime(body: bytes) -> bytes:
    try:
        return base64.b64decode(body, validate=False)
    except ValueError as exc:
        raise _graph_error(
            400,
            "ErrorMimeContentInvalidBase64String",
            "Invalid base64 string for MIME content.",
        ) from exc


def _recipients(mime: bytes) -> list[str]:
    parsed = email.message_from_bytes(mime, policy=email.policy.compat32)
    values = [str(v) for name in ("to", "cc", "bcc") for v in parsed.get_all(name, [])]
    return [address.lower() for _, address in getaddresses(values) if address]


ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (method, re.compile(pattern), name)
    for method, pattern, name in [
        ("GET", r"/(?P<tenant>[^/]+)/v2\.0/\.well-known/openid-configuration", "oidc"),
        ("GET", r"/(?P<tenant>[^/]+)/oauth2/v2\.0/authorize", "authorize"),
        ("POST", r"/(?P<tenant>[^/]+)/oauth2/v2\.0/token", "token"),
        ("POST", r"/_exchange/introspect", "introspect"),
        ("PUT", r"/upload/(?P<session>[^/]+)", "upload"),
        ("GET", r"/v1\.0/users/(?P<user>[^/]+)/mailFolders", "folders"),
        (
            "GET",
            r"/v1\.0/users/(?P<user>[^/]+)/mailFolders/(?P<folder>[^/]+)",
            "folder",
        ),
        (
            "GET",
            r"/v1\.0/users/(?P<user>[^/]+)/mailFolders/(?P<folder>[^/]+)/childFolders",
            "children",
        ),
        (
            "GET",
            r"/v1\.0/users/(?P<user>[^/]+)/mailFolders/(?P<folder>[^/]+)/messages/delta",
            "delta",
        ),
        (
            "GET",
            r"/v1\.0/users/(?P<user>[^/]+)/messages/(?P<message>[^/]+)/\$value",
            "mime",
        ),
        ("PATCH", r"/v1\.0/users/(?P<user>[^/]+)/messages/(?P<message>[^/]+)", "patch"),
        (
            "DELETE",
            r"/v1\.0/users/(?P<user>[^/]+)/messages/(?P<message>[^/]+)",
            "delete",
        ),
        (
            "POST",
            r"/v1\.0/users/(?P<user>[^/]+)/messages/(?P<message>[^/]+)/move",
            "move",
        ),
        ("POST", r"/v1\.0/users/(?P<user>[^/]+)/sendMail", "send_mail"),
        ("POST", r"/v1\.0/users/(?P<user>[^/]+)/messages", "create_draft"),
        (
            "POST",
            r"/v1\.0/users/(?P<user>[^/]+)/messages/(?P<message>[^/]+)/attachments",
            "attach",
        ),
        (
            "POST",
            r"/v1\.0/users/(?P<user>[^/]+)/messages/(?P<message>[^/]+)"
            r"/attachments/createUploadSession",
            "upload_session",
        ),
        (
            "POST",
            r"/v1\.0/users/(?P<user>[^/]+)/messages/(?P<message>[^/]+)/send",
            "send_draft",
        ),
    ]
]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that refuses the certificate or hangs up is part of what
        # the tests do, not a failure of the fake.
        if not isinstance(sys.exc_info()[1], ssl.SSLError | ConnectionError):
            super().handle_error(request, client_address)


def _handler_for(fake: GraphFake) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        pass

    Handler.fake = fake
    return Handler


class _Handler(AzureAdRoutes, BaseHTTPRequestHandler):
    fake: GraphFake
    protocol_version = "HTTP/1.1"
    # Headers and body leave in one write, so no request waits on a delayed ACK.
    disable_nagle_algorithm = True
    wbufsize = 64 * 1024

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read ``fake.requests`` instead."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        self.query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""

        with self.fake.lock:
            self.fake.requests.append((method, path))
            try:
                for route_method, pattern, name in ROUTES:
                    match = pattern.fullmatch(path)
                    if route_method == method and match:
                        getattr(self, f"_{name}")(**match.groupdict())
                        return
                self._graph_fail(
                    _graph_error(
                        400, "BadRequest", f"Unsupported request {method} {path}"
                    )
                )
            except AadError as exc:
                self._aad_fail(exc)
            except GraphError as exc:
                self._graph_fail(exc)

    # Responses

    def _respond(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        if body:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _json(
        self, status: int, data: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        body = json.dumps(data).encode() if data else b""
        self._respond(status, body, headers=headers)

    def _graph_fail(self, exc: GraphError) -> None:
        request_id = str(uuid.uuid4())
        headers = {"request-id": request_id, **exc.headers}
        if exc.status == 401:
            headers["WWW-Authenticate"] = (
                f'Bearer realm="", authorization_uri="{self.fake.url}/common/oauth2/'
                'authorize", client_id="00000003-0000-0000-c000-000000000000"'
            )
        self._json(
            exc.status,
            {
                "error": {
                    "code": exc.code,
                    "message": exc.message,
                    "innerError": {
                        "date": _now(),
                        "request-id": request_id,
                        "client-request-id": request_id,
                    },
                }
            },
            headers,
        )

    def _graph(self, user: str, needs: frozenset[str]) -> FakeMailbox:
        """Authenticate a Graph request and find its mailbox."""
        self.fake.authenticate(self.headers.get("Authorization"), needs)
        throttled = self.fake.throttled()
        if throttled is not None:
            raise throttled
        if len(self.body) > REQUEST_LIMIT:
            raise _graph_error(
                413,
                "ErrorRequestEntityTooLarge",
                "The request is larger than the 4 MB Microsoft Graph allows.",
            )
        return self.fake._mailbox(user)

    def _message(self, box: FakeMailbox, message_id: str) -> StoredMessage:
        message = box.messages.get(message_id)
        if message is None:
            raise _graph_error(
                404,
                "ErrorItemNotFound",
                "The specified object was not found in the store.",
            )
        return message

    def _json_body(self) -> dict[str, Any]:
        try:
            data = json.loads(self.body or b"{}")
        except ValueError as exc:
            raise _graph_error(
                400, "BadRequest", "Unable to read JSON request payload."
            ) from exc
        if not isinstance(data, dict):
            raise _graph_error(400, "BadRequest", "The JSON payload must be an object.")
        return data

    # Graph routes

    def _folders(self, user: str) -> None:
        box = self._graph(user, READ)
        root = box.well_known["msgfolderroot"]
        self._folder_page(box, root, "mailFolders")

    def _children(self, user: str, folder: str) -> None:
        box = self._graph(user, READ)
        parent = box.resolve(folder)
        if parent is None:
            raise _graph_error(
                404, "ErrorItemNotFound", "The specified folder was not found."
            )
        self._folder_page(box, parent.id, f"mailFolders/{parent.id}/childFolders")

    def _folder_page(self, box: FakeMailbox, parent_id: str, path: str) -> None:
        hidden = self.query.get("includeHiddenFolders", "").lower() == "true"
        folders = [f for f in box.children(parent_id) if hidden or not f.hidden]
        top = int(self.query.get("$top", "10"))
        skip = int(self.query.get("$skip", "0"))
        context = f"{self.fake.graph_url}/$metadata#users('{box.address}')/{path}"
        page: dict[str, Any] = {
            "@odata.context": context,
            "value": [
                self.fake.folder_json(box, f) for f in folders[skip : skip + top]
            ],
        }
        if skip + top < len(folders):
            params = {"$top": top, "$skip": skip + top}
            if hidden:
                params["includeHiddenFolders"] = "true"
            page["@odata.nextLink"] = (
                f"{self.fake.graph_url}/users/{quote(box.address)}/{path}?{urlencode(params)}"
            )
        self._json(200, page)

    def _folder(self, user: str, folder: str) -> None:
        box = self._graph(user, READ)
        found = box.resolve(folder)
        if found is None:
            raise _graph_error(
                404, "ErrorItemNotFound", "The specified folder was not found."
            )
        self._json(200, self.fake.folder_json(box, found))

    def _delta(self, user: str, folder: str) -> None:
        box = self._graph(user, READ)
        found = box.resolve(folder)
        if found is None:
            raise _graph_error(
                404, "ErrorItemNotFound", "The specified folder was not found."
            )
        prefer = re.search(r"odata\.maxpagesize=(\d+)", self.headers.get("Prefer", ""))
        page_size = int(prefer.group(1)) if prefer else 10
        page = self.fake.delta_page(box, found, self.query, page_size)
        headers = (
            {"Preference-Applied": f"odata.maxpagesize={page_size}"} if prefer else {}
        )
        self._json(200, page, headers)

    def _mime(self, user: str, message: str) -> None:
        box = self._graph(user, READ)
        found = self._message(box, message)
        self._respond(200, found.mime, "text/plain")

    def _patch(self, user: str, message: str) -> None:
        box = self._graph(user, WRITE)
        found = self._message(box, message)
        changes = self._json_body()
        if "isRead" in changes:
            found.is_read = bool(changes["isRead"])
            found.changed_seq = box.next_seq()
        self._json(200, self.fake.message_json(box, found))

    def _delete(self, user: str, message: str) -> None:
        box = self._graph(user, WRITE)
        box.remove(self._message(box, message))
        self._respond(204)

    def _move(self, user: str, message: str) -> None:
        box = self._graph(user, WRITE)
        found = self._message(box, message)
        destination = box.resolve(str(self._json_body().get("destinationId", "")))
        if destination is None:
            raise _graph_error(
                404,
                "ErrorItemNotFound",
                "The specified object was not found in the store.",
            )
        box.remove(found)
        # Exchange gives a moved message a new id in its new folder.
        new_id = box.put(destination.id, found.mime, is_read=found.is_read)
        self._json(201, self.fake.message_json(box, box.messages[new_id]))

    def _send_mail(self, user: str) -> None:
        box = self._graph(user, SEND)
        content_type = self.headers.get("Content-Type", "")
        if content_type.startswith("text/plain"):
            self.fake.send_mime(box, self.body)
        else:
            data = self._json_body()
            if "message" not in data:
                raise _graph_error(
                    400, "ErrorInvalidParameter", "The message is missing."
                )
            mime = json.dumps(data["message"]).encode()
            recipients = [
                r["emailAddress"]["address"].lower()
                for kind in ("toRecipients", "ccRecipients", "bccRecipients")
                for r in data["message"].get(kind, [])
            ]
            self.fake.sent.append(
                SentMessage(box.address, mime, recipients, [], "json")
            )
        self._respond(202)

    def _create_draft(self, user: str) -> None:
        box = self._graph(user, WRITE)
        if not self.headers.get("Content-Type", "").startswith("text/plain"):
            raise _graph_error(
                400, "ErrorInvalidParameter", "The fake creates drafts from MIME only."
            )
        mime = _decode_mime(self.body)
        draft_id = box.put(box.well_known["drafts"], mime, is_read=True)
        draft = box.messages[draft_id]
        draft.is_draft = True
        self._json(201, self.fake.message_json(box, draft))

    def _attach(self, user: str, message: str) -> None:
        box = self._graph(user, WRITE)
        draft = self._message(box, message)
        data = self._json_body()
        if data.get("@odata.type") != "#microsoft.graph.fileAttachment":
            raise _graph_error(400, "ErrorInvalidParameter", "Only file attachments.")
        content = base64.b64decode(data.get("contentBytes", ""))
        draft.attachments.append(
            FileAttachment(
                data.get("name", ""),
                data.get("contentType", "application/octet-stream"),
                content,
            )
        )
        self._json(
            201,
            {
                "@odata.type": "#microsoft.graph.fileAttachment",
                "id": _new_id(),
                "name": data.get("name", ""),
                "size": len(content),
            },
        )

    def _upload_session(self, user: str, message: str) -> None:
        box = self._graph(user, WRITE)
        draft = self._message(box, message)
        item = self._json_body().get("AttachmentItem") or {}
        size = int(item.get("size", 0))
        if item.get("attachmentType") != "file" or not item.get("name") or size <= 0:
            raise _graph_error(
                400,
                "ErrorInvalidParameter",
                "AttachmentItem needs attachmentType, name and size.",
            )
        if size > ATTACHMENT_LIMIT:
            raise _graph_error(
                400,
                "ErrorAttachmentSizeLimitExceeded",
                "The attachment is over 150 MB.",
            )
        session_id = secrets.token_urlsafe(16)
        upload_url = f"{self.fake.url}/upload/{session_id}?authtoken={uuid.uuid4()}"
        self.fake.uploads[session_id] = UploadSession(
            box.address,
            draft.id,
            item["name"],
            item.get("contentType", "application/octet-stream"),
            size,
        )
        self._json(
            201,
            {
                "@odata.context": (
                    f"{self.fake.graph_url}/$metadata#microsoft.graph.uploadSession"
                ),
                "uploadUrl": upload_url,
                "expirationDateTime": _expiry(),
                "nextExpectedRanges": ["0-"],
            },
        )

    def _upload(self, session: str) -> None:
        if "Authorization" in self.headers:
            # The upload URL carries its own authorisation; Outlook refuses a
            # second one.
            raise _graph_error(
                401,
                "InvalidAuthenticationToken",
                "Send no Authorization header to a pre-authenticated upload URL.",
            )
        status, data, headers = self.fake.upload(
            session, self.headers.get("Content-Range", ""), self.body
        )
        self._json(status, data, headers)

    def _send_draft(self, user: str, message: str) -> None:
        box = self._graph(user, SEND)
        draft = self._message(box, message)
        if not draft.is_draft:
            raise _graph_error(400, "ErrorInvalidOperation", "Only drafts can be sent.")
        self.fake.sent.append(
            SentMessage(
                box.address,
                draft.mime,
                _recipients(draft.mime),
                list(draft.attachments),
                "draft",
            )
        )
        box.remove(draft)
        box.put(box.well_known["sentitems"], draft.mime, is_read=True)
        self._respond(202)


@pytest.fixture
def graph_fake(pki: TestPki) -> Iterator[GraphFake]:
    """A running fake of Azure AD and Graph, stopped after the test."""
    with GraphFake(pki) as fake:
        yield fake
