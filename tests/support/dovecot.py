"""A real Dovecot IMAP and POP3 server that the tests start for themselves.

Each instance writes its own configuration, users and Maildirs into a
temporary directory and listens on free high ports of 127.0.0.1 only: plain
IMAP and POP3 (with STARTTLS), and IMAPS and POP3S with the test CA's
certificate. The packaged Dovecot service is never used.

Run as root, Dovecot's login processes refuse to run as root, so they run as
``dovenull``, the internal ones as ``dovecot``, and the mail belongs to
``dovecot``. Run as another user, every process runs as that user.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path

import pytest
from imapclient import IMAPClient

from tests.support.tls import TestPki

HOST = "127.0.0.1"
START_SECONDS = 15.0
STOP_SECONDS = 10.0
SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"]
)
INSTALL_HINT = "run scripts/install-test-servers.sh as root to install it"
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")
UNSAFE_IN_PASSWORD = re.compile(r"[:\r\n\x00]")
APPENDUID = re.compile(rb"APPENDUID \d+ (\d+)")

CONFIG = """\
instance_name = {instance}
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
auth_verbose = yes

protocols = imap pop3
listen = {host}
default_login_user = {login_user}
default_internal_user = {internal_user}
default_internal_group = {internal_group}
first_valid_uid = 1
first_valid_gid = 1
{mail_owner}
ssl = yes
ssl_cert = <{cert_file}
ssl_key = <{key_file}
{ssl_dh}
disable_plaintext_auth = no
auth_mechanisms = plain login{oauth2_mechanisms}

# Tests try wrong passwords on purpose: answer without the usual wait, and
# never slow down the later logins from 127.0.0.1.
auth_failure_delay = 0
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}

{oauth2_passdb}passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/users/%u
}}
userdb {{
  driver = static
  args = home={root}/mail/%u
}}

mail_location = maildir:~/Maildir
namespace inbox {{
  inbox = yes
  separator = /
  prefix =
  mailbox Drafts {{
    special_use = \\Drafts
    auto = subscribe
  }}
  mailbox Junk {{
    special_use = \\Junk
    auto = subscribe
  }}
  mailbox Sent {{
    special_use = \\Sent
    auto = subscribe
  }}
  mailbox Trash {{
    special_use = \\Trash
    auto = subscribe
  }}
}}

service imap-login {{
  inet_listener imap {{
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = {imaps_port}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    port = {pop3s_port}
    ssl = yes
  }}
}}
{unprivileged}"""

# Tokens are checked by asking the Azure AD fake (RFC 7662 introspection).
OAUTH2_PASSDB = """passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {root}/dovecot-oauth2.conf.ext
}}
"""
OAUTH2_CONFIG = """\
introspection_mode = post
introspection_url = {url}
force_introspection = yes
username_attribute = username
active_attribute = active
active_value = true
tls_ca_cert_file = {ca_file}
"""

# Without root nothing can chroot, so the processes that would must not try.
UNPRIVILEGED = """
service anvil {
  chroot =
}
service imap-login {
  chroot =
}
service pop3-login {
  chroot =
}
"""


class Dovecot:
    """One Dovecot instance with its own users, mail and ports."""

    def __init__(self, pki: TestPki, *, introspection_url: str | None = None) -> None:
        """With ``introspection_url`` the server also takes XOAUTH2 and
        OAUTHBEARER logins, checking each token at that URL."""
        self.pki = pki
        self.introspection_url = introspection_url
        self.host = HOST
        self.root = Path(tempfile.mkdtemp(prefix="mailroom-dovecot-"))
        self.config_file = self.root / "dovecot.conf"
        self.users_dir = self.root / "users"
        self.log_file = self.root / "dovecot.log"
        self.master_log_file = self.root / "master.log"
        ports = _free_ports(4)
        self.imap_port, self.imaps_port, self.pop3_port, self.pop3s_port = ports
        self._passwords: dict[str, str] = {}
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start Dovecot and return once every port accepts connections."""
        binary = shutil.which("dovecot", path=SEARCH_PATH)
        if binary is None:
            raise RuntimeError(f"the dovecot binary is not installed; {INSTALL_HINT}")

        self._prepare_files()

        with self.master_log_file.open("wb") as master_log:
            self._process = subprocess.Popen(
                [binary, "-F", "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=master_log,
                stderr=subprocess.STDOUT,
            )

        self._wait_until_listening()

    def stop(self) -> None:
        """Stop the server and delete its files; safe to call twice."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_SECONDS)

        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        """What Dovecot wrote to its logs so far, for failure messages."""
        parts = []
        for path in (self.master_log_file, self.log_file):
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def add_user(self, name: str, password: str) -> None:
        """Add a user that logs in with this plain password."""
        if not USER_NAME.match(name):
            raise ValueError(f"{name!r} is not a user name this server takes")
        if UNSAFE_IN_PASSWORD.search(password):
            raise ValueError("a password may not hold ':', CR, LF or NUL")
        if name in self._passwords:
            raise ValueError(f"user {name!r} exists already")

        self._passwords[name] = password

        # A file per user: Dovecot can miss a change to a shared passwd file
        # made within a second of its last look, and refuse the new user.
        passwd = self.users_dir / name
        passwd.write_text(f"{name}:{{PLAIN}}{password}::::::\n")
        passwd.chmod(0o644)

    def client(self, user: str) -> IMAPClient:
        """An IMAP client logged in as ``user`` on the plain port."""
        client = IMAPClient(self.host, self.imap_port, ssl=False, timeout=10)
        client.login(user, self._passwords[user])
        return client

    def append(self, user: str, raw: bytes, folder: str = "INBOX") -> int:
        """Store a message in a folder (made if missing) and return its UID."""
        with self.client(user) as client:
            if not client.folder_exists(folder):
                client.create_folder(folder)

            response = client.append(folder, raw)

        match = APPENDUID.search(response)
        if match is None:
            raise RuntimeError(f"Dovecot's APPEND reply has no UID: {response!r}")
        return int(match.group(1))

    def message_count(self, user: str, folder: str = "INBOX") -> int:
        with self.client(user) as client:
            status = client.folder_status(folder, [b"MESSAGES"])
        return int(status[b"MESSAGES"])

    def uidvalidity(self, user: str, folder: str = "INBOX") -> int:
        with self.client(user) as client:
            status = client.folder_status(folder, [b"UIDVALIDITY"])
        return int(status[b"UIDVALIDITY"])

    def reset_uidvalidity(self, user: str, folder: str = "INBOX") -> int:
        """Make Dovecot number a folder anew, keeping its messages.

        Removing the Maildir's UID list and indexes is what a restored backup
        or a rebuilt mailbox looks like to a client: the same messages under a
        new UIDVALIDITY, numbered again from 1. Returns the new UIDVALIDITY.
        Call it while no session of the user is open: Dovecot takes files
        vanishing under an open mailbox for corruption.
        """
        before = self.uidvalidity(user, folder)

        maildir = self.root / "mail" / user / "Maildir"
        if folder != "INBOX":
            maildir = maildir / ("." + folder.replace("/", "."))
        for path in [maildir / "dovecot-uidlist", *maildir.glob("dovecot.index*")]:
            path.unlink(missing_ok=True)

        after = self.uidvalidity(user, folder)
        if after == before:
            raise RuntimeError(f"UIDVALIDITY of {folder} stayed {before}")
        return after

    def _prepare_files(self) -> None:
        as_root = os.geteuid() == 0
        if as_root:
            login_user, internal_user, internal_group = "dovenull", "dovecot", "dovecot"
            mail_owner = "mail_uid = dovecot\nmail_gid = dovecot"
            unprivileged = ""
        else:
            login_user = internal_user = pwd.getpwuid(os.geteuid()).pw_name
            internal_group = grp.getgrgid(os.getegid()).gr_name
            mail_owner = ""
            unprivileged = UNPRIVILEGED

        dh_file = Path("/usr/share/dovecot/dh.pem")
        config = CONFIG.format(
            instance=f"mailroom-test-{uuid.uuid4().hex[:8]}",
            root=self.root,
            host=self.host,
            login_user=login_user,
            internal_user=internal_user,
            internal_group=internal_group,
            mail_owner=mail_owner,
            unprivileged=unprivileged,
            cert_file=self.pki.cert_file,
            key_file=self.pki.key_file,
            ssl_dh=f"ssl_dh = <{dh_file}" if dh_file.exists() else "",
            imap_port=self.imap_port,
            imaps_port=self.imaps_port,
            pop3_port=self.pop3_port,
            pop3s_port=self.pop3s_port,
            oauth2_mechanisms=" xoauth2 oauthbearer" if self.introspection_url else "",
            oauth2_passdb=(
                OAUTH2_PASSDB.format(root=self.root) if self.introspection_url else ""
            ),
        )
        self.config_file.write_text(config)
        if self.introspection_url:
            # The auth process is not root and cannot read the test's own files.
            ca_file = self.root / "ca.pem"
            shutil.copyfile(self.pki.ca_file, ca_file)
            ca_file.chmod(0o644)
            oauth2 = self.root / "dovecot-oauth2.conf.ext"
            oauth2.write_text(
                OAUTH2_CONFIG.format(url=self.introspection_url, ca_file=ca_file)
            )
            oauth2.chmod(0o644)
        self.users_dir.mkdir()

        # The unprivileged processes must reach their sockets, the users and
        # the mail; the temporary directory is private to its maker.
        self.root.chmod(0o755)
        self.users_dir.chmod(0o755)
        mail = self.root / "mail"
        mail.mkdir()
        if as_root:
            owner = pwd.getpwnam("dovecot")
            os.chown(mail, owner.pw_uid, owner.pw_gid)
        mail.chmod(0o700)

    def _wait_until_listening(self) -> None:
        assert self._process is not None
        ports = [self.imap_port, self.imaps_port, self.pop3_port, self.pop3s_port]
        deadline = time.monotonic() + START_SECONDS

        while ports:
            if self._process.poll() is not None:
                self._fail(f"exited with status {self._process.returncode}")
            if time.monotonic() > deadline:
                self._fail(f"did not listen on ports {ports} in {START_SECONDS} s")

            try:
                with socket.create_connection((self.host, ports[0]), timeout=1):
                    ports.pop(0)
            except OSError:
                time.sleep(0.05)

    def _fail(self, what: str) -> None:
        log = self.log()
        self.stop()
        raise RuntimeError(f"Dovecot {what}; its log:\n{log}")


def _free_ports(count: int) -> list[int]:
    """Ports the kernel has just handed out, so free a moment ago."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(closing(socket.socket())) for _ in range(count)]
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]


@pytest.fixture(scope="session")
def dovecot(pki: TestPki) -> Iterator[Dovecot]:
    """A Dovecot for the whole run; tests add users of their own."""
    with Dovecot(pki) as server:
        yield server
