#!/usr/bin/env bash
# `moat apply` end to end: 50 busybox containers over 5 domains from scratch
# (goal <= 5 s), then a no-op re-apply (goal <= 200 ms, median of 10 with
# hyperfine), then `destroy --all --force`. Needs root, hyperfine, a release build:
#   scripts/build-release.sh
#   sudo bench/apply/run.sh [MACHINES_PER_DOMAIN]
# Env: MOAT_BIN (default $CARGO_TARGET_DIR/release/moat), BENCH_DIR (default /var/tmp).
# Uses its own root and subnets 10.170-10.175, and removes everything it made on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
MOAT=${MOAT_BIN:-$TARGET/release/moat}
export MOAT_SUPERVISOR=${MOAT_SUPERVISOR:-$(dirname "$MOAT")/moat-supervisor}
PER=${1:-10}
for f in "$MOAT" "$MOAT_SUPERVISOR"; do
  [[ -x $f ]] || { echo "missing $f: scripts/build-release.sh" >&2; exit 2; }
done
[[ $EUID -eq 0 ]] || { echo "needs root" >&2; exit 2; }
command -v hyperfine >/dev/null || { echo "needs hyperfine (apt-get install hyperfine)" >&2; exit 2; }

W=$(mktemp -d "${BENCH_DIR:-/var/tmp}/moat-bench-apply.XXXX")
# mktemp makes it 0700: machines could not reach their rootfs under it.
chmod 755 "$W"
R=$W/r
P=$W/p
mkdir -p "$P"
m() { "$MOAT" --root "$R" -f "$P" --color never "$@"; }

cleanup() {
  set +e
  m destroy --all --force >/dev/null 2>&1 || echo "destroy --all --force failed; sweeping" >&2
  for pid in $(pgrep -f "$R/" || true); do kill -9 "$pid" 2>/dev/null || true; done
  sleep 0.2
  grep -F " $R/" /proc/mounts | awk '{print length($2), $2}' | sort -rn | cut -d' ' -f2- |
    while read -r mnt; do umount "$mnt" 2>/dev/null || umount -l "$mnt" || true; done
  if [[ -n ${TAG:-} ]]; then
    for l in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^m[tv]$TAG-" || true); do
      ip link del "$l" 2>/dev/null || true
    done
    nft delete table inet "moat_$TAG" 2>/dev/null || true
    nft delete table bridge "moat_$TAG" 2>/dev/null || true
  fi
  for c in /sys/fs/cgroup/*/moat/bench*; do [[ -d $c ]] && rmdir "$c" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT

# Domain names start with "bench" so machine names (and their cgroups) are
# unlikely to meet another root's.
TRUST=(admin trusted semi-trusted untrusted disposable)
{
  echo "schema_version: 1"
  echo "project: bench-apply"
  echo 'addressing: {base: "10.170", zone_step: 1}'
  echo "domains:"
  for d in 0 1 2 3 4; do
    echo "  bench$d:"
    echo "    trust_level: ${TRUST[$d]}"
    echo "    egress: none"
    echo "    machines:"
    for i in $(seq 0 $((PER - 1))); do echo "      m$i: {}"; done
  done
  echo "policies:"
  echo "  - {from: bench1, to: bench0-m0, ports: [8080]}"
} > "$P/moat.yml"
TAG=$(m status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["root_tag"])')
N=$((PER * 5))

echo "== moat apply: $N busybox containers, 5 domains, from scratch"
t0=$(date +%s.%N)
m apply >"$W/apply.log" 2>&1 || { echo "apply failed:" >&2; tail -20 "$W/apply.log" >&2; exit 1; }
t1=$(date +%s.%N)
running=$(m status --json | python3 -c 'import json,sys; print(sum(x["state"]=="running" for x in json.load(sys.stdin)["machines"]))')
printf 'from scratch: %.2f s (%s/%s running; goal <= 5 s)\n' "$(echo "$t1 - $t0" | bc)" "$running" "$N"

echo "== no-op re-apply (hyperfine, 10 runs)"
hyperfine -N -w 1 -r 10 --export-json "$W/noop.json" \
  "$MOAT --root $R -f $P --color never apply -q" >/dev/null
python3 - "$W/noop.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"][0]
print(f"no-op apply: median {r['median']*1000:.0f} ms, mean {r['mean']*1000:.0f} ms, "
      f"min {r['min']*1000:.0f} ms, max {r['max']*1000:.0f} ms (goal <= 200 ms)")
PY

echo "== destroy --all --force"
t0=$(date +%s.%N)
rc=0; m destroy --all --force >"$W/destroy.log" 2>&1 || rc=$?
t1=$(date +%s.%N)
printf 'destroy: %.2f s (exit %s)\n' "$(echo "$t1 - $t0" | bc)" "$rc"
left=$(grep -cF " $R/" /proc/mounts || true)
echo "mounts left after destroy: $left"
