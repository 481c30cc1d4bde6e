#!/usr/bin/env bash
# Install the services the tests start themselves: redis-server (the Redis tier's tests run a real server on a free
# loopback port with persistence off; nothing is started or enabled here).
# Idempotent and non-interactive: does nothing when redis-server is already on PATH; otherwise installs Debian's
# package with apt-get (as root, or through sudo when it is there). Exits non-zero with a reason when it cannot.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
    echo "install_services: $(redis-server --version | head -n 1) already installed"
    exit 0
fi

fail() {
    echo "install_services: cannot install redis-server: $*" >&2
    echo "install_services: install it by hand (Debian/Ubuntu: apt-get install redis-server) and re-run" >&2
    exit 1
}

command -v apt-get >/dev/null 2>&1 || fail "apt-get not found (not a Debian-based system)"
if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    fail "not root and no password-less sudo"
fi

export DEBIAN_FRONTEND=noninteractive
# policy-rc.d exit 101 stops the package's post-install from starting a system-wide server (we start our own);
# it is removed again on exit, whatever happens.
policy=/usr/sbin/policy-rc.d
added_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${as_root[@]}" tee "$policy" >/dev/null && "${as_root[@]}" chmod +x "$policy"
    added_policy=1
fi
cleanup() { if [ "$added_policy" -eq 1 ]; then "${as_root[@]}" rm -f "$policy"; fi; }
trap cleanup EXIT

"${as_root[@]}" apt-get update -qq || fail "apt-get update failed"
"${as_root[@]}" apt-get install -y -qq --no-install-recommends redis-server >/dev/null ||
    fail "apt-get install redis-server failed"
command -v redis-server >/dev/null 2>&1 || fail "redis-server still not on PATH after installing"
echo "install_services: installed $(redis-server --version | head -n 1)"
