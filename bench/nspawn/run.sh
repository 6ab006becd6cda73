#!/usr/bin/env bash
# Start-to-exec latency of a busybox machine: the nspawn driver (systemd-nspawn
# under moat-supervisor, cgroups, user namespace, /proc masking) against the
# native driver (moat's libcontainer runtime), same rootfs, same rounds
# (start → exec /bin/true answers → stop). Prints medians, p90 and the ratio.
# Needs root, busybox-static, systemd-container.
# Build first: cargo build --release -p moat-driver --example nspawn_start_exec
#              cargo build --release -p moat-runtime --bins
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}/${PROFILE:-release}
bin=$target/examples/nspawn_start_exec
export MOAT_SUPERVISOR=$target/moat-supervisor
[ -x "$bin" ] && [ -x "$MOAT_SUPERVISOR" ] || {
  echo "build first: cargo build --release -p moat-driver --example nspawn_start_exec && cargo build --release -p moat-runtime --bins" >&2
  exit 1
}
exec "$bin" "${ROUNDS:-20}"
