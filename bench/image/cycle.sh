#!/bin/sh
# The image store's share of `moat run --rm busybox -- true`: a disposable machine's rootfs
# created, mounted (overlayfs, volatile), unmounted and destroyed. Prints per-phase medians.
# Needs root. Usage: bench/image/cycle.sh [ITERATIONS] [STORE_PARENT_DIR]
set -eu
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build -q -p moat-image --example machine_cycle
"$CARGO_TARGET_DIR/debug/examples/machine_cycle" "${1:-50}" "${2:-/var/tmp}"
