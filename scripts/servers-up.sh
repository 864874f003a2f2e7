#!/usr/bin/env bash
# Makes sure PostgreSQL and RabbitMQ answer on this machine, starting the
# local ones when they are installed but stopped. Servers elsewhere (set by
# MAILROOM_DATABASE_URL / MAILROOM_AMQP_URL) are only waited for.
set -euo pipefail

pg_host=${PGHOST:-127.0.0.1}
pg_port=${PGPORT:-5432}
amqp_host=${AMQP_HOST:-127.0.0.1}
amqp_port=${AMQP_PORT:-5672}

answers() {
    python3 - "$1" "$2" <<'PY'
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
except OSError:
    sys.exit(1)
PY
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

if ! answers "$pg_host" "$pg_port" && command -v pg_ctlcluster >/dev/null; then
    echo "servers-up: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start || true
fi
wait_for PostgreSQL "$pg_host" "$pg_port"

if ! answers "$amqp_host" "$amqp_port" && command -v rabbitmq-server >/dev/null; then
    echo "servers-up: starting RabbitMQ"
    rabbitmq-server -detached || true
fi
wait_for RabbitMQ "$amqp_host" "$amqp_port"
