#!/usr/bin/env bash
# Installs moat on this Debian/Ubuntu machine: host packages, a release build,
# and the binaries in /usr/local/bin. Run as root: `sudo ./install.sh`.
set -euo pipefail
cd "$(dirname "$0")"
[[ $EUID -eq 0 ]] || { echo "error: run as root (sudo ./install.sh)" >&2; exit 1; }
scripts/deps.sh
cargo build --release --locked -p moat-cli -p moat-runtime
install -m 0755 target/release/moat /usr/local/bin/moat
if [[ -x target/release/moat-supervisor ]]; then
  install -m 0755 target/release/moat-supervisor /usr/local/bin/moat-supervisor
fi
# The microVM guest's PID 1, linked statically so the initramfs needs no libraries.
cargo rustc --release --locked -p moat-init --bin moat-init -- -C target-feature=+crt-static
install -m 0755 target/release/moat-init /usr/local/bin/moat-init
mkdir -p /usr/local/share/man/man1
/usr/local/bin/moat man > /usr/local/share/man/man1/moat.1
echo "installed: $(/usr/local/bin/moat --version)" >&2
echo "next: moat init && moat plan" >&2
