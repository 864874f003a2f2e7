"""Run the benchmarks and print one table: `.venv/bin/python -m benchmarks`.

    --quick              fewer messages and shorter loops (about two minutes)
    --only router,sender run only these (router, publishing, poller, sender,
                         large_mail, latency)
    --profile DIR        also profile the router and sender with pyinstrument
    --keep               keep the work directory (worker logs, mbsync mail)

Progress goes to stderr, the table to stdout. The exit status is 1 when a
benchmark could not run; a target that is not met is reported, not an error.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from benchmarks import large_mail, latency, poller, publishing, router, sender
from benchmarks.environment import BenchEnv
from benchmarks.report import Figure, Report

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS: dict[str, Callable[[BenchEnv], list[Figure]]] = {
    "router": router.run,
    "publishing": publishing.run,
    "poller": poller.run,
    "sender": sender.run,
    "large_mail": large_mail.run,
    "latency": latency.run,
}
NEEDS_DOVECOT = {"poller", "large_mail", "latency"}


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    selected = _selected(args.only)
    _install_servers(selected)
    signal.signal(signal.SIGTERM, _interrupt)

    started = time.monotonic()
    report = Report(quick=args.quick)
    with BenchEnv.create(
        quick=args.quick, profile_dir=args.profile, keep=args.keep
    ) as env:
        _progress(f"work directory {env.work}, broker prefix {env.prefix}")
        for name in selected:
            _progress(f"{name} ...")
            begun = time.monotonic()
            try:
                report.figures += BENCHMARKS[name](env)
            except Exception as exc:  # noqa: BLE001 - reported in the table
                report.figures.append(Figure.failed(name, exc))
                with env.log_file.open("a") as log:
                    traceback.print_exc(file=log)
                hint = "" if args.keep else " (--keep keeps the logs)"
                _progress(f"{name} failed: {type(exc).__name__}: {exc}{hint}")
            _progress(f"{name} done in {time.monotonic() - begun:.0f} s")
        report.seconds = time.monotonic() - started
        if args.keep:
            _progress(f"kept {env.work}")

    print(report.render())
    return 1 if any(f.error for f in report.figures) else 0


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Mailroom's benchmarks, each next to a baseline of the same run.",
    )
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument(
        "--only", default="", help="comma-separated: " + ",".join(BENCHMARKS)
    )
    parser.add_argument(
        "--profile", type=Path, default=None, help="write pyinstrument profiles here"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args(argv)


def _selected(only: str) -> list[str]:
    if not only:
        return list(BENCHMARKS)
    names = [name.strip().replace("-", "_") for name in only.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        choices = ", ".join(BENCHMARKS)
        raise SystemExit(
            f"unknown benchmark {', '.join(unknown)}; choose from {choices}"
        )
    return [name for name in BENCHMARKS if name in names]


def _install_servers(selected: list[str]) -> None:
    """Dovecot and mbsync come from Debian; the test servers' script installs them."""
    if not NEEDS_DOVECOT & set(selected):
        return
    if shutil.which("dovecot", path="/usr/sbin:/usr/bin") and shutil.which("mbsync"):
        return
    _progress("installing test servers (scripts/install-test-servers.sh)")
    subprocess.run([str(ROOT / "scripts" / "install-test-servers.sh")], check=False)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _progress(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
