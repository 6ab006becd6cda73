#!/usr/bin/env bash
# Installs moat on this Debian/Ubuntu machine: host packages, a release build,
# and the binaries in /usr/local/bin. Run as root: `sudo ./install.sh`.
set -euo pipefail
cd "$(dirname "$0")"
[[ $EUID -eq 0 ]] || { echo "error: run as root (sudo ./install.sh)" >&2; exit 1; }
scripts/deps.sh
# Static binaries (see the script); moat-init, the microVM guest's PID 1,
# must be: its initramfs has no libraries.
scripts/build-release.sh
T=${CARGO_TARGET_DIR:-target}/release
for b in moat moat-supervisor moat-init; do
  install -m 0755 "$T/$b" "/usr/local/bin/$b"
done
mkdir -p /usr/local/share/man/man1
/usr/local/bin/moat man > /usr/local/share/man/man1/moat.1
echo "installed: $(/usr/local/bin/moat --version)" >&2
echo "next: moat init && moat plan" >&2
