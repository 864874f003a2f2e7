"""Mailboxes on the benchmark's Dovecot, and channels that poll them.

Ten thousand messages go in as files written straight into the user's
Maildir (``<root>/mail/<user>/Maildir/new``, the layout tests/support/dovecot.py
configures), which takes a second where APPEND would take minutes; Dovecot
numbers them when the folder is first opened, which ``fill`` does at once so
that no measurement pays for it.
"""

from __future__ import annotations

import os
import pwd
import uuid
from pathlib import Path

from benchmarks.environment import BenchEnv
from shared.catalog import Channel
from tests.support.dovecot import Dovecot


def add_user(dovecot: Dovecot, name: str) -> tuple[str, str]:
    user, password = f"{name}{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    dovecot.add_user(user, password)
    return user, password


def fill(dovecot: Dovecot, user: str, messages: list[bytes], folder: str = "") -> int:
    """Put the messages in the user's INBOX (or a folder); returns its count."""
    home = dovecot.root / "mail" / user
    maildir = home / "Maildir"
    directories = [home, maildir]
    if folder:
        maildir = maildir / f".{folder}"
        directories.append(maildir)
    directories += [maildir / "cur", maildir / "new", maildir / "tmp"]

    owner = pwd.getpwnam("dovecot") if os.geteuid() == 0 else None
    for path in directories:
        path.mkdir(exist_ok=True)
        _own(path, owner, 0o700)

    stamp = uuid.uuid4().hex[:8]
    for number, raw in enumerate(messages):
        path = maildir / "new" / f"1764841800.M{number}P{stamp}.bench"
        path.write_bytes(raw)
        _own(path, owner, 0o600)

    return dovecot.message_count(user, folder or "INBOX")


def _own(path: Path, owner: pwd.struct_passwd | None, mode: int) -> None:
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)
    path.chmod(mode)


def imap_channel(
    env: BenchEnv,
    name: str,
    user: str,
    password: str,
    *,
    folder: str = "INBOX",
    idle: bool = False,
    active: bool = False,
) -> Channel:
    """A channel polling the user's folder over plain IMAP on 127.0.0.1."""
    dovecot = env.dovecot
    with env.connect_db() as conn:
        env.add_campaigns(conn, "general")
        catalog = env.catalog(conn)
        channel = catalog.add_channel(
            name,
            address=f"{user}@bench.example",
            default_campaign="general",
            inbound={
                "type": "imap",
                "host": dovecot.host,
                "port": dovecot.imap_port,
                "security": "none",
                "username": user,
                "folder": folder,
                "idle": idle,
            },
            secrets={"inbound_password": password},
        )
        if active:
            channel = catalog.set_active(channel.id, True)
    return channel
