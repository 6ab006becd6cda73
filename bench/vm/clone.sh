#!/bin/sh
# Clone time of a stopped full VM must not depend on its disk size.
# Medians of moat_qemu::vm::clone_vm for a 10 MiB disk, a 10 GiB sparse disk and a 10 GiB disk
# with DATA_MIB (default 256) written, in one run, next to a full copy (qemu-img convert) of the
# last one. Fails when a 10 GiB median exceeds MAX_RATIO (default 5) times the 10 MiB median.
#
# Usage: bench/vm/clone.sh [ITERATIONS] [PARENT_DIR]   (as root; needs qemu-img, qemu-io, genisoimage)
set -eu
cd "$(dirname "$0")/../.."
ITER=${1:-9}
PARENT=${2:-/var/tmp}
MAX_RATIO=${MAX_RATIO:-5}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build -q -p moat-qemu --example vm_clone_bench
OUT=$("$CARGO_TARGET_DIR/debug/examples/vm_clone_bench" "$ITER" "$PARENT")
echo "$OUT" | grep -v '^RESULT'
set -- $(echo "$OUT" | sed -n 's/^RESULT //p')
awk -v a="$1" -v b="$2" -v c="$3" -v r="$4" -v u="$5" -v cp="$6" -v m="$MAX_RATIO" 'BEGIN {
  printf "ratio 10GiB/10MiB %.2f, 10GiB+data/10MiB %.2f; full copy / clone %.0fx\n", r, u, cp / c
  if (r > m || u > m) { printf "FAIL: clone time depends on disk size (> %s)\n", m; exit 1 }
  printf "OK: clone is constant-time (ratios <= %s)\n", m }'
