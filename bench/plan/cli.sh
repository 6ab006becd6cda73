#!/usr/bin/env bash
# `moat plan` end to end (load + validate + allocate + observe + plan) on
# generated projects of 100 x 10 and 1,000 x 10 machines (goal: 1,000 x 10 < 1 s),
# each time against a fresh, empty root. Needs hyperfine and a release build:
#   scripts/build-release.sh
#   bench/plan/cli.sh [RUNS]
# Env: MOAT_BIN (default $CARGO_TARGET_DIR/release/moat).
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
MOAT=${MOAT_BIN:-$TARGET/release/moat}
RUNS=${1:-5}
[[ -x $MOAT ]] || { echo "missing $MOAT: scripts/build-release.sh" >&2; exit 2; }
command -v hyperfine >/dev/null || { echo "needs hyperfine" >&2; exit 2; }
W=$(mktemp -d /tmp/moat-bench-plan.XXXX)
trap 'rm -rf "$W"' EXIT

for d in 100 1000; do
  bench/plan/gen-project.py "$W/p$d" --domains "$d" --machines 10 --policies 100 >/dev/null
  # A fresh root for every run: plan against an empty host.
  hyperfine -N -r "$RUNS" --export-json "$W/$d.json" \
    --prepare "rm -rf $W/root" \
    "$MOAT --root $W/root -f $W/p$d -q plan" >/dev/null
  python3 - "$W/$d.json" "$d" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"][0]
d = int(sys.argv[2])
print(f"moat plan {d} domains x 10 = {d*10} machines: median {r['median']*1000:.0f} ms "
      f"(min {r['min']*1000:.0f}, max {r['max']*1000:.0f}, {len(r['times'])} runs)")
PY
  if [[ $d -eq 1000 ]]; then
    /usr/bin/time -f "max RSS %M KiB" "$MOAT" --root "$W/root2" -f "$W/p$d" -q plan >/dev/null
  fi
done
