#!/usr/bin/env bash
# Installs the peer contenders: rathole (crates.io) and OpenSSH's server (Debian).
# A contender that cannot be installed is reported as missing by proxy-bench, never dropped.
set -uo pipefail
# `rathole --genkey` works only in a build with the noise feature: an older plain-only build
# (earlier versions of this script made one) is rebuilt.
if ! rathole --genkey >/dev/null 2>&1; then
  # Not --locked: rathole 0.5.0's lock file pins a `time` release that no longer builds on
  # current Rust. Plain TCP and Noise transports (the `rathole-noise` contender, an encrypted
  # peer); Noise is pure Rust (snowstorm), so no OpenSSL is needed, unlike its TLS transport.
  cargo install --force rathole --no-default-features --features server,client,noise \
    || echo "setup: rathole could not be installed" >&2
fi
if ! [ -x /usr/sbin/sshd ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client) \
    || echo "setup: openssh-server could not be installed" >&2
fi
exit 0
