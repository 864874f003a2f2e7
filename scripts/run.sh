#!/usr/bin/env bash
# Quick start: install, make sure PostgreSQL and RabbitMQ run, create the
# schema, and run poller, router and sender in the foreground (Ctrl-C stops
# them). Settings come from MAILROOM_* variables; see the README.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
scripts/servers-up.sh

# A key to encrypt stored passwords, kept in var/ so it survives restarts.
if [[ -z ${MAILROOM_SECRET_KEYS:-} ]]; then
    mkdir -p var
    if [[ ! -s var/secret.key ]]; then
        .venv/bin/mailroom secrets new-key >var/secret.key
        chmod 600 var/secret.key
        echo "run: wrote a new encryption key to var/secret.key"
    fi
    MAILROOM_SECRET_KEYS=$(cat var/secret.key)
    export MAILROOM_SECRET_KEYS
fi

.venv/bin/mailroom migrate
exec .venv/bin/mailroom run all
