#!/usr/bin/env bash
# Installs the Debian packages of the servers the tests start for themselves.
#
# Safe to run again: when every package is already installed it does nothing.
# The tests run their own instances on free high ports of 127.0.0.1, so the
# packaged services are kept from starting (and stopped if they were running)
# rather than left listening on the standard ports.
set -euo pipefail

# One package a line; add new servers here.
PACKAGES=(
    dovecot-imapd
    dovecot-pop3d
    prometheus
    isync
    chromium
    chromium-driver
)

# Packaged services that must not stay running after the install.
SERVICES=(
    dovecot
    prometheus
)

missing=()
for package in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
    if [[ "$status" != "install ok installed" ]]; then
        missing+=("$package")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "install-test-servers: run as root to install: ${missing[*]}" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

# invoke-rc.d asks policy-rc.d whether a package may start its service;
# exit code 101 says no. A policy already in place (as in containers) is kept.
policy=/usr/sbin/policy-rc.d
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi

# Lists are refreshed only when apt has none that offers a package, or when
# the ones it has name versions the mirror no longer serves.
if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
    apt-get update -qq
fi

if ! apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

for service in "${SERVICES[@]}"; do
    if [[ -d /run/systemd/system ]]; then
        systemctl disable --now "$service" >/dev/null 2>&1 || true
    elif [[ -x "/etc/init.d/$service" ]]; then
        "/etc/init.d/$service" stop >/dev/null 2>&1 || true
    fi
done
