#!/usr/bin/env bash
# Installs everything the tests need, then runs lint, type checks and the
# whole test suite against real PostgreSQL, RabbitMQ, Dovecot and SMTP
# servers. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh dev
scripts/install-test-servers.sh
scripts/servers-up.sh

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
mkdir -p test-artifacts
.venv/bin/pytest -p no:cacheprovider "$@"
