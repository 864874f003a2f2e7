"""An IMAP mailbox read by UID: new mail since a checkpoint, left unread.

Messages are found by UID above the folder's checkpoint and downloaded with
BODY.PEEK, so the poller never sets \\Seen and a person reading the same
mailbox sees what they saw before. A message over the download limit is
reported with its size and not downloaded.

The connection helpers at the end (the TLS context of an account and the
wording of a failed connection) serve the POP3 client too.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

from imapclient import IMAPClient
from imapclient.exceptions import CapabilityError, LoginError

from services.poller.fetched import Fetched
from shared.accounts import ImapAccount, Security
from shared.checkpoints import Checkpoint
from shared.errors import ChannelAuthError, ChannelConnectError, ChannelProtocolError
from shared.logs import get_logger
from shared.models import MailSource, Protocol
from shared.xoauth2 import Bearer, log_in_renewing

log = get_logger(__name__)

# Mail the mailbox's owner wrote or threw away, and views that repeat mail of
# other folders: none of it is new customer mail, so "all folders" skips it.
NOT_CUSTOMER_MAIL = frozenset(
    {b"\\sent", b"\\drafts", b"\\trash", b"\\all", b"\\flagged", b"\\important"}
)
NOT_SELECTABLE = frozenset({b"\\noselect", b"\\nonexistent"})

# UIDs looked at per FETCH of sizes, which keeps the answer of a large folder
# (a line per message, held whole by imaplib) to a few MB.
SEARCH_SPAN = 50_000

UID_ITEM = re.compile(rb"\bUID (\d+)")
SIZE_ITEM = re.compile(rb"\bRFC822\.SIZE (\d+)")
BODY = b"BODY[]"


class ImapMailbox:
    """One logged-in IMAP connection; use it as a context manager."""

    def __init__(
        self, account: ImapAccount, credential: str | Bearer, *, timeout: float
    ):
        """``credential`` is the password, or the bearer of an XOAUTH2 login."""
        self.account = account
        self.timeout = timeout
        self._credential = credential
        self._client: IMAPClient | None = None
        self._where = f"IMAP server {account.host}:{account.port}"

    def __repr__(self) -> str:
        return f"ImapMailbox({self.account.username!r} at {self._where})"

    def __enter__(self) -> ImapMailbox:
        client = self._connect()
        try:
            self._log_in(client)
        except BaseException:
            _shut(client)
            raise

        self._client = client
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        client, self._client = self._client, None
        if client is None:
            return

        try:
            client.logout()
        except (IMAPClient.Error, OSError):
            _shut(client)

    def folders(self, *, all_folders: bool) -> list[str]:
        """The folders to poll: the account's folder, or every folder of mail.

        With ``all_folders`` that is every folder that can hold messages
        (INBOX, its sub-folders, Junk and any other), except those whose
        SPECIAL-USE marks them as written by the mailbox's owner (Sent,
        Drafts) or as thrown away (Trash), and the virtual views that repeat
        mail of other folders (All, Flagged, Important).
        """
        if not all_folders:
            return [self.account.folder]

        with self._talking("list the folders"):
            listing = self._connected().list_folders()

        names = []
        for flags, _separator, name in listing:
            attributes = {flag.lower() for flag in flags}
            if attributes & (NOT_SELECTABLE | NOT_CUSTOMER_MAIL):
                continue
            names.append(str(name))

        inbox = [name for name in names if name.upper() == "INBOX"]
        return inbox + [name for name in names if name.upper() != "INBOX"]

    def fetch_new(
        self,
        folder: str,
        checkpoint: Checkpoint | None,
        *,
        batch: int,
        max_bytes: int,
    ) -> Iterator[tuple[list[Fetched], Checkpoint]]:
        """Messages above the checkpoint, in batches of at most ``batch`` UIDs.

        Each batch comes with the checkpoint that is safe to store once the
        batch has been published. Without a checkpoint, or when the folder's
        UIDVALIDITY changed, the whole folder is read again from UID 1: the
        router drops the messages it has already routed by their content.
        """
        if batch < 1:
            raise ValueError("batch must be at least 1")
        if checkpoint is not None and checkpoint.folder != folder:
            raise ValueError(
                f"checkpoint of folder {checkpoint.folder!r} given for {folder!r}"
            )

        uidvalidity, uidnext = self._examine(folder)
        first = 1
        if checkpoint is not None and checkpoint.uidvalidity == uidvalidity:
            first = checkpoint.last_uid + 1

        for sizes in self._new_sizes(first, uidnext, folder):
            uids = sorted(sizes)
            for start in range(0, len(uids), batch):
                chunk = uids[start : start + batch]
                fetched = self._fetch(folder, uidvalidity, chunk, sizes, max_bytes)
                yield fetched, Checkpoint(folder, uidvalidity, chunk[-1])

    def supports_idle(self) -> bool:
        with self._talking("read its capabilities"):
            return bool(self._connected().has_capability("IDLE"))

    def wait_for_new_mail(
        self, folder: str, stop: threading.Event, *, renew_seconds: float
    ) -> bool:
        """Sit in IDLE on the folder until mail arrives, ``stop`` is set, or
        ``renew_seconds`` pass; True when the server announced new mail.

        Servers drop an IDLE left alone for about 30 minutes (RFC 2177), so the
        caller renews it well before that by calling again.
        """
        client = self._connected()
        self._examine(folder)
        deadline = time.monotonic() + renew_seconds
        changed = False
        with self._talking(f"wait in IDLE on folder {folder!r}"):
            client.idle()
            try:
                while not (changed or stop.is_set() or time.monotonic() > deadline):
                    responses = client.idle_check(timeout=1.0)
                    changed = any(
                        len(r) > 1 and r[1] in (b"EXISTS", b"RECENT")
                        for r in responses
                        if isinstance(r, tuple)
                    )
            finally:
                client.idle_done()
        return changed

    def _examine(self, folder: str) -> tuple[int, int | None]:
        """Open the folder read-only; its UIDVALIDITY and UIDNEXT."""
        client = self._connected()
        try:
            status = client.select_folder(folder, readonly=True)
        except IMAPClient.AbortError as exc:
            raise self._lost(f"opening folder {folder!r}", exc) from exc
        except IMAPClient.Error as exc:
            raise ChannelProtocolError(
                f"{self._where} could not open folder {folder!r} ({_reply(exc)}); "
                "check that the folder exists and that the channel names it "
                "with the server's separator, e.g. INBOX/Orders"
            ) from exc
        except OSError as exc:
            raise self._lost(f"opening folder {folder!r}", exc) from exc

        if b"UIDVALIDITY" not in status:
            raise ChannelProtocolError(
                f"{self._where} opened folder {folder!r} without a UIDVALIDITY; "
                "the server cannot be polled by UID"
            )

        uidnext = status.get(b"UIDNEXT")
        return int(status[b"UIDVALIDITY"]), int(uidnext) if uidnext else None

    def _new_sizes(
        self, first: int, uidnext: int | None, folder: str
    ) -> Iterator[dict[int, int]]:
        """The size of each message from UID ``first`` on, one span at a time.

        A UID FETCH of a range answers for the messages in it and no others,
        so one command finds the new mail and the sizes the download limit
        is checked against.
        """
        doing = f"look for new messages in folder {folder!r}"
        if uidnext is None:
            sizes = self._sizes(f"{first}:*", doing)
            # "N:*" names the last message even when N is above every UID.
            yield {uid: size for uid, size in sizes.items() if uid >= first}
            return

        for low in range(first, uidnext, SEARCH_SPAN):
            high = min(low + SEARCH_SPAN, uidnext) - 1
            sizes = self._sizes(f"{low}:{high}", doing)
            found = {uid: size for uid, size in sizes.items() if low <= uid <= high}
            if found:
                yield found

    def _sizes(self, uid_set: str, doing: str) -> dict[int, int]:
        sizes = {}
        for line in self._uid_fetch(uid_set, "(UID RFC822.SIZE)", doing):
            if isinstance(line, bytes):
                uid, size = _number(UID_ITEM, line), _number(SIZE_ITEM, line)
                if uid is not None and size is not None:
                    sizes[uid] = size
        return sizes

    def _fetch(
        self,
        folder: str,
        uidvalidity: int,
        uids: list[int],
        sizes: dict[int, int],
        max_bytes: int,
    ) -> list[Fetched]:
        doing = f"fetch messages of folder {folder!r}"
        wanted = [uid for uid in uids if sizes[uid] <= max_bytes]
        bodies = self._bodies(wanted, doing) if wanted else {}

        fetched = []
        for uid in uids:
            size = sizes[uid]
            data: bytes | None = None
            if size <= max_bytes:
                # A message without a body was expunged since its size came.
                data = bodies.pop(uid, None)
                if data is None:
                    continue

            source = MailSource(
                protocol=Protocol.IMAP, folder=folder, uidvalidity=uidvalidity, uid=uid
            )
            fetched.append(Fetched(source=source, data=data, size=size))
        return fetched

    def _bodies(self, uids: list[int], doing: str) -> dict[int, bytes]:
        """The messages' bytes by UID, read with BODY.PEEK so none turns \\Seen.

        The literals are taken from imaplib's answer as they are: imapclient's
        parser would read every message a second time and copy it.
        """
        bodies: dict[int, bytes] = {}
        answer = self._uid_fetch(_uid_set(uids), "(UID BODY.PEEK[])", doing)
        for index, line in enumerate(answer):
            if not isinstance(line, tuple):
                continue

            head, literal = line
            uid = _number(UID_ITEM, head)
            if uid is None and index + 1 < len(answer):
                # The server may name the UID after the literal, in the trailer.
                trailer = answer[index + 1]
                if isinstance(trailer, bytes):
                    uid = _number(UID_ITEM, trailer)
            if uid is not None and BODY in head:
                bodies[uid] = literal
        return bodies

    def _uid_fetch(
        self, uid_set: str, items: str, doing: str
    ) -> list[bytes | tuple[bytes, bytes]]:
        """Send one UID FETCH through imaplib and return its untagged answer."""
        imap = self._connected()._imap
        with self._talking(doing):
            status, answer = imap.uid("FETCH", uid_set, items)
            if status != "OK":
                raise IMAPClient.Error(
                    b" ".join(a for a in answer if isinstance(a, bytes)).decode(
                        "utf-8", "replace"
                    )
                )
        return [line for line in answer if line is not None]

    def _connect(self) -> IMAPClient:
        account = self.account
        context = tls_context(account.verify_tls, account.ca_file, self._where)
        implicit = account.security is Security.TLS

        try:
            client = IMAPClient(
                account.host,
                account.port,
                ssl=implicit,
                ssl_context=context if implicit else None,
                timeout=self.timeout,
            )
        except IMAPClient.Error as exc:
            raise ChannelProtocolError(
                f"{self._where} did not greet like an IMAP server; check that "
                "the port is the server's IMAP port (usually 993, or 143)"
            ) from exc
        except OSError as exc:
            raise connect_failure(exc, self._where, self.timeout) from exc

        # imapclient turns imaplib's wire log to its most verbose level, at
        # which imaplib formats the repr of every message it reads, whether
        # or not anything logs it: that doubled the memory a large message
        # took and cost a third of the time of a fetch.
        client._imap.debug = 0

        if account.security is Security.STARTTLS:
            try:
                client.starttls(context)
            except CapabilityError as exc:
                _shut(client)
                raise ChannelConnectError(
                    f"{self._where} does not offer STARTTLS; use security 'tls' "
                    "with its implicit TLS port (usually 993)"
                ) from exc
            except (IMAPClient.Error, OSError) as exc:
                _shut(client)
                if isinstance(exc, OSError):
                    raise connect_failure(exc, self._where, self.timeout) from exc
                raise ChannelConnectError(
                    f"{self._where} refused STARTTLS ({_reply(exc)})"
                ) from exc

        return client

    def _log_in(self, client: IMAPClient) -> None:
        if not isinstance(self._credential, str):
            self._log_in_with_token(client, self._credential)
            return
        try:
            client.login(self.account.username, self._credential)
        except LoginError as exc:
            raise ChannelAuthError(
                f"{self._where} refused the login of {self.account.username!r} "
                f"({_reply(exc)}); check the user name and password, and that "
                "the mailbox allows IMAP with a password"
            ) from exc
        except IMAPClient.AbortError as exc:
            raise self._lost("logging in", exc) from exc
        except OSError as exc:
            raise self._lost("logging in", exc) from exc

    def _log_in_with_token(self, client: IMAPClient, bearer: Bearer) -> None:
        """AUTHENTICATE XOAUTH2; a refused token is renewed and tried once more."""
        username = self.account.username
        self._require_xoauth2(client)
        try:
            log_in_renewing(
                bearer, lambda token: client.oauth2_login(username, token), LoginError
            )
        except LoginError as exc:
            raise ChannelAuthError(
                f"{self._where} refused the OAuth token for {username!r} "
                f"({_reply(exc)}); check that the user name is the mailbox the "
                "token is for, that the app has the IMAP permission, and that "
                "the mailbox allows IMAP"
            ) from exc
        except (IMAPClient.AbortError, OSError) as exc:
            raise self._lost("logging in", exc) from exc

    def _require_xoauth2(self, client: IMAPClient) -> None:
        try:
            offered = client.has_capability("AUTH=XOAUTH2")
        except (IMAPClient.Error, OSError) as exc:
            raise self._lost("asking for its capabilities", exc) from exc
        if not offered:
            raise ChannelAuthError(
                f"{self._where} does not offer AUTHENTICATE XOAUTH2 on this "
                "connection; sign in with a password instead, or check the "
                "security setting: many servers offer it only over TLS"
            )

    def _connected(self) -> IMAPClient:
        if self._client is None:
            raise RuntimeError("use the mailbox inside a with block")
        return self._client

    @contextmanager
    def _talking(self, doing: str) -> Iterator[None]:
        """Turn the library's errors while ``doing`` into the channel's."""
        try:
            yield
        except IMAPClient.AbortError as exc:
            raise self._lost(doing, exc) from exc
        except IMAPClient.Error as exc:
            raise ChannelProtocolError(
                f"{self._where} refused to {doing} ({_reply(exc)})"
            ) from exc
        except OSError as exc:
            raise self._lost(doing, exc) from exc

    def _lost(self, doing: str, exc: BaseException) -> ChannelConnectError:
        if isinstance(exc, TimeoutError):
            return ChannelConnectError(
                f"{self._where} did not answer within {self.timeout:g} s "
                f"while {doing}; the poll is retried"
            )
        return ChannelConnectError(
            f"connection to {self._where} was lost while {doing} "
            f"({type(exc).__name__}: {exc}); the poll is retried"
        )


def tls_context(verify: bool, ca_file: str | None, where: str) -> ssl.SSLContext:
    """A client TLS context that checks the server unless told not to.

    ``ca_file`` adds a private CA to the system's trusted ones.
    """
    context = ssl.create_default_context()
    if not verify:
        log.warning(
            "TLS certificate checks are off for this channel (verify_tls is "
            "false); anyone on the path can read its mail",
            server=where,
        )
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context

    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ChannelConnectError(
                f"the CA file {ca_file} for {where} could not be read "
                f"({type(exc).__name__}: {exc}); fix the channel's ca_file"
            ) from exc
    return context


def connect_failure(
    exc: BaseException, where: str, timeout: float
) -> ChannelConnectError:
    """Say in an operator's words why a connection could not be made."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ChannelConnectError(
            f"the TLS certificate of {where} could not be verified "
            f"({exc.verify_message}); give the channel the issuing CA in "
            "ca_file, or have the server's certificate fixed"
        )
    if isinstance(exc, ssl.SSLError):
        return ChannelConnectError(
            f"TLS with {where} failed ({exc.reason or exc}); check that the "
            "security setting matches the port: 'tls' for implicit TLS "
            "(993, 995), 'starttls' or 'none' for the plain ports (143, 110)"
        )
    if isinstance(exc, socket.gaierror):
        return ChannelConnectError(
            f"the host name of {where} could not be resolved ({exc.strerror}); "
            "check the host name"
        )
    if isinstance(exc, ConnectionRefusedError):
        return ChannelConnectError(
            f"{where} refused the connection; check the host and port, and that "
            "the server is running"
        )
    if isinstance(exc, TimeoutError):
        return ChannelConnectError(
            f"{where} did not answer within {timeout:g} s; check the host and "
            "port, that a firewall lets the poller through, and that the port "
            "does not expect TLS when security is 'none' or 'starttls'"
        )
    return ChannelConnectError(
        f"could not connect to {where} ({type(exc).__name__}: {exc}); check "
        "the host and port"
    )


def _reply(exc: BaseException) -> str:
    """The server's words from an imaplib error, without Python's b'' quoting."""
    text = str(exc)
    for prefix in ("b'", 'b"'):
        if prefix in text and text.endswith(prefix[-1]):
            head, _, body = text.partition(prefix)
            text = head + body[:-1]
    return text.strip()[:300]


def _number(item: re.Pattern[bytes], line: bytes) -> int | None:
    found = item.search(line)
    return int(found.group(1)) if found else None


def _uid_set(uids: list[int]) -> str:
    """The UIDs as an IMAP set, runs of consecutive UIDs written as ranges."""
    parts = []
    start = previous = uids[0]
    for uid in uids[1:]:
        if uid != previous + 1:
            parts.append(f"{start}:{previous}" if previous > start else str(start))
            start = uid
        previous = uid
    parts.append(f"{start}:{previous}" if previous > start else str(start))
    return ",".join(parts)


def _shut(client: IMAPClient) -> None:
    try:
        client.shutdown()
    except OSError:
        return
