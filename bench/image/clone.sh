#!/bin/sh
# Clone time must not depend on the image size (nor on the size of the source's changes).
# Measures MachineFs::clone_to side by side for a 1 MiB and a 1 GiB image in one run and
# fails when the 1 GiB median is more than MAX_RATIO times the 1 MiB median (noise margin:
# a copy of 1 GiB would take ~1000x longer than of 1 MiB).
#
# Usage: bench/image/clone.sh [ITERATIONS] [STORE_PARENT_DIR]   (env MAX_RATIO, default 5)
set -eu
cd "$(dirname "$0")/../.."
ITER=${1:-7}
PARENT=${2:-/var/tmp}
MAX_RATIO=${MAX_RATIO:-5}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build -q -p moat-image --example clone_bench
OUT=$("$CARGO_TARGET_DIR/debug/examples/clone_bench" "$ITER" "$PARENT")
echo "$OUT" | grep -v '^RESULT'
set -- $(echo "$OUT" | sed -n 's/^RESULT //p')
awk -v r="$4" -v u="$5" -v m="$MAX_RATIO" 'BEGIN {
  if (r > m || u > m) { printf "FAIL: clone time depends on size (ratios %s, %s > %s)\n", r, u, m; exit 1 }
  printf "OK: clone is constant-time (ratios %.2f and %.2f <= %s)\n", r, u, m }'
