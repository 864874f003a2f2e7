#!/usr/bin/env bash
# Makes sure PostgreSQL and RabbitMQ answer. The servers are the ones
# MAILROOM_DATABASE_URL and MAILROOM_AMQP_URL name (localhost by default);
# local ones that are installed but stopped are started, remote ones are only
# waited for.
set -euo pipefail

# host and port of a URL, with the scheme's usual port when none is given
endpoint() {
    python3 - "$1" "$2" <<'PY'
import sys
from urllib.parse import urlsplit
url, default_port = sys.argv[1], sys.argv[2]
parts = urlsplit(url)
print(parts.hostname or "127.0.0.1", parts.port or default_port)
PY
}

answers() {
    python3 - "$1" "$2" <<'PY'
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
except OSError:
    sys.exit(1)
PY
}

is_local() {
    [[ $1 == 127.* || $1 == localhost || $1 == ::1 ]]
}

wait_for() {
    local name=$1 host=$2 port=$3
    for _ in $(seq 1 60); do
        answers "$host" "$port" && return 0
        sleep 1
    done
    echo "servers-up: $name does not answer on $host:$port; start it and retry" >&2
    exit 1
}

read -r pg_host pg_port < <(endpoint \
    "${MAILROOM_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/mailroom}" 5432)
read -r amqp_host amqp_port < <(endpoint \
    "${MAILROOM_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672//}" 5672)

if is_local "$pg_host" && ! answers "$pg_host" "$pg_port" \
    && command -v pg_ctlcluster >/dev/null; then
    echo "servers-up: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start || true
fi
wait_for PostgreSQL "$pg_host" "$pg_port"

if is_local "$amqp_host" && ! answers "$amqp_host" "$amqp_port" \
    && command -v rabbitmq-server >/dev/null; then
    echo "servers-up: starting RabbitMQ"
    rabbitmq-server -detached || true
fi
wait_for RabbitMQ "$amqp_host" "$amqp_port"
