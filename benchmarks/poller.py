"""Poller throughput: a 10,000-message Dovecot mailbox fetched and published.

``Poller.poll_channel`` reads the folder by UID over plain IMAP on 127.0.0.1
in batches of MAILROOM_FETCH_BATCH, publishes each batch as RawEmail with
confirms and moves the checkpoint, as it does in production. The baseline is
``mbsync`` (isync) copying the same folder over IMAP into a local Maildir,
with a configuration of the benchmark's own (no TLS, FSync off so that the
disk does not slow the baseline down).

Each side runs once untimed first, so both meet a server whose indexes and
page cache are warm; a full run then takes the best of two rounds.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path

from benchmarks.environment import BenchEnv
from benchmarks.mailbox import add_user, fill, imap_channel
from benchmarks.report import Figure, Target, Unit
from benchmarks.workers import profiling
from services.poller.worker import Poller
from shared.broker import Publisher
from shared.catalog import Catalog

MBSYNC_SECONDS = 600
# A Maildir in memory shows how fast mbsync's IMAP side is; on this disk,
# shared with RabbitMQ's message store, writing the files can dominate.
MEMORY = Path("/dev/shm")

MBSYNCRC = """\
FSync no

IMAPAccount bench
Host {host}
Port {port}
User {user}
Pass {password}
SSLType None
AuthMechs LOGIN

IMAPStore bench-far
Account bench

MaildirStore bench-near
Path {local}/
Inbox {local}/INBOX

Channel bench
Far :bench-far:
Near :bench-near:
Patterns INBOX
Create Near
Sync Pull
SyncState *
"""


class PollerUnderTest:
    """A Poller with its connections made by hand, polling one channel."""

    def __init__(self, env: BenchEnv, channel_id: int, expected: int) -> None:
        self.env = env
        self.channel_id = channel_id
        self.expected = expected
        self.cpu_share = 0.0

    def rate(self, profile: Path | None = None) -> float:
        env = self.env
        poller = Poller(env.settings)
        connection = env.broker()
        try:
            with env.connect_db() as conn:
                conn.execute(
                    "DELETE FROM mailbox_checkpoints WHERE channel_id = %s",
                    (self.channel_id,),
                )
                env.purge(connection, env.topology.raw_queue)
                poller.db = conn
                poller.catalog = Catalog(conn, poller.box)
                poller.publisher = Publisher(connection)

                started = time.perf_counter()
                cpu = time.process_time()
                with profiling(profile):
                    published = poller.poll_channel(self.channel_id)
                seconds = time.perf_counter() - started
                self.cpu_share = (time.process_time() - cpu) / seconds
            env.purge(connection, env.topology.raw_queue)
        finally:
            connection.release()

        if published != self.expected:
            raise RuntimeError(
                f"the poller published {published} of {self.expected} messages; "
                f"see {env.log_file}"
            )
        return published / seconds


def mbsync_rate(
    env: BenchEnv, user: str, password: str, expected: int, under: Path
) -> float:
    directory = under / f"mbsync-{uuid.uuid4().hex[:6]}"
    local = directory / "mail"
    local.mkdir(parents=True)
    config = directory / "mbsyncrc"
    config.write_text(
        MBSYNCRC.format(
            host=env.dovecot.host,
            port=env.dovecot.imap_port,
            user=user,
            password=password,
            local=local,
        )
    )
    config.chmod(0o600)

    started = time.perf_counter()
    done = subprocess.run(
        ["mbsync", "-c", str(config), "-q", "bench"],
        capture_output=True,
        text=True,
        timeout=MBSYNC_SECONDS,
        check=False,
    )
    seconds = time.perf_counter() - started
    fetched = _files(local / "INBOX")
    if not env.keep or under == MEMORY:
        shutil.rmtree(directory, ignore_errors=True)

    if done.returncode != 0 or fetched != expected:
        raise RuntimeError(
            f"mbsync fetched {fetched} of {expected} messages "
            f"(exit {done.returncode}): {done.stderr.strip()[:500]}"
        )
    return fetched / seconds


def _files(maildir: Path) -> int:
    return sum(
        1
        for sub in ("cur", "new")
        if (maildir / sub).is_dir()
        for path in (maildir / sub).iterdir()
        if path.is_file()
    )


def run(env: BenchEnv) -> list[Figure]:
    count = 2_000 if env.quick else 10_000
    rounds = 2
    messages = env.mail.copies(count, f"poller-{env.run_id}")
    size = sum(map(len, messages))
    del messages[count:]

    user, password = add_user(env.dovecot, "poll")
    stored = fill(env.dovecot, user, messages)
    del messages
    if stored != count:
        raise RuntimeError(f"Dovecot counts {stored} of {count} messages written")
    channel = imap_channel(env, "poller-throughput", user, password)
    poller = PollerUnderTest(env, channel.id, count)
    with_mbsync = shutil.which("mbsync") is not None
    places = [("disk", env.work)]
    if MEMORY.is_dir():
        places.append(("tmpfs", MEMORY))

    poller.rate(env.profile_dir / "poller" if env.profile_dir else None)
    for _name, under in places if with_mbsync else []:
        mbsync_rate(env, user, password, count, under)

    ours: list[tuple[float, float]] = []
    theirs: dict[str, list[float]] = {name: [] for name, _under in places}
    for _round in range(rounds):
        ours.append((poller.rate(), poller.cpu_share))
        for name, under in places if with_mbsync else []:
            theirs[name].append(mbsync_rate(env, user, password, count, under))

    note = (
        f"{count:,} messages of {size / count / 1024:.0f} KB on average, cycling "
        f"through {env.mail.sources()}; fetch batch {env.settings.fetch_batch}; "
        f"best of {rounds} after an untimed round each; mbsync with FSync off; "
        f"poller process CPU busy {max(ours)[1]:.0%}"
    )
    name = f"poller: IMAP fetch + publish, {count:,} msgs"
    if not with_mbsync:
        note += "; mbsync is not installed (Debian package isync)"
        return [Figure(name, max(ours)[0], Unit.RATE, note=note)]

    return [
        Figure(
            name,
            max(ours)[0],
            Unit.RATE,
            f"mbsync IMAP -> Maildir on {place}",
            max(theirs[place]),
            Target.ratio_at_least(1.0),
            note=note if place == "disk" else "",
        )
        for place, _under in places
    ]
