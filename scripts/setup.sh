#!/usr/bin/env bash
# Creates .venv and installs Mailroom into it (with the test tools when given
# "dev"). Safe to run again: an up-to-date environment is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=${1:-}
python=${PYTHON:-python3}

if [[ ! -x .venv/bin/python ]]; then
    "$python" -m venv .venv
fi

stamp=.venv/.installed${extras:+-$extras}
# An install with the test tools serves a plain run too.
if [[ -z $extras && -f .venv/.installed-dev && ! pyproject.toml -nt .venv/.installed-dev ]]; then
    exit 0
fi
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    if [[ -n $extras ]]; then
        .venv/bin/python -m pip install --quiet -e ".[$extras]"
    else
        .venv/bin/python -m pip install --quiet -e .
    fi
    touch "$stamp"
fi
