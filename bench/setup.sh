#!/usr/bin/env bash
# Installs the peer contenders: rathole (crates.io) and OpenSSH's server (Debian).
# A contender that cannot be installed is reported as missing by proxy-bench, never dropped.
set -uo pipefail
if ! command -v rathole >/dev/null 2>&1; then
  cargo install rathole --locked || echo "setup: rathole could not be installed" >&2
fi
if ! [ -x /usr/sbin/sshd ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client) \
    || echo "setup: openssh-server could not be installed" >&2
fi
exit 0
