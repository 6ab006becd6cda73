#!/usr/bin/env bash
# The whole CLI: `moat run --rm busybox -- true` without a network and
# attached to a domain network (`--domain lab`), side by side with the
# runtime alone (run_once --supervised, the floor the CLI adds to) and
# `runc run` on the same busybox rootfs, in one hyperfine run.
# Goals (issue 3): <= 20 ms without a network, <= 40 ms with --domain.
#   scripts/build-release.sh && cargo build --release -p moat-runtime --examples
#   sudo bench/run/cli.sh            (RUNS=30 by default)
# Uses its own root and the subnet 10.177.x, removes everything on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET=${CARGO_TARGET_DIR:-$PWD/target}/release
MOAT=${MOAT_BIN:-$TARGET/moat}
export MOAT_SUPERVISOR=${MOAT_SUPERVISOR:-$TARGET/moat-supervisor}
RUNNER=$TARGET/examples/run_once
RUNS=${RUNS:-30}
for f in "$MOAT" "$MOAT_SUPERVISOR" "$RUNNER"; do
  [[ -x $f ]] || { echo "missing $f: scripts/build-release.sh && cargo build --release -p moat-runtime --examples" >&2; exit 2; }
done
[[ $EUID -eq 0 ]] || { echo "needs root" >&2; exit 2; }
command -v hyperfine >/dev/null || { echo "needs hyperfine" >&2; exit 2; }

W=$(mktemp -d "${BENCH_DIR:-/var/tmp}/moat-bench-cli.XXXX")
chmod 755 "$W"
R=$W/r
P=$W/p
mkdir -p "$P"
m() { "$MOAT" --root "$R" -f "$P" --color never "$@"; }
cleanup() {
  set +e
  m destroy --all --force >/dev/null 2>&1 || echo "destroy --all --force failed" >&2
  grep -F " $R/" /proc/mounts | awk '{print length($2), $2}' | sort -rn | cut -d' ' -f2- |
    while read -r mnt; do umount "$mnt" 2>/dev/null || umount -l "$mnt" || true; done
  rm -rf "$W"
}
trap cleanup EXIT

cat >"$P/moat.yml" <<'EOF'
schema_version: 1
project: bench-cli
addressing: {base: "10.177", zone_step: 1}
domains:
  lab:
    trust_level: trusted
    egress: none
    machines: {}
EOF
m apply -q
m image build busybox -q >/dev/null 2>&1 || true

# The runtime floor gets the image's own rootfs folder.
root=$W/rootfs
mkdir -p "$root"/{bin,etc,proc,sys,dev,tmp}
cp /bin/busybox "$root/bin/"
chroot "$root" /bin/busybox --install -s /bin
chmod 755 "$root"
cmds=(-n cli "$MOAT --root $R -f $P --color never run --rm busybox -- true")
cmds+=(-n cli-domain "$MOAT --root $R -f $P --color never run --rm --domain lab busybox -- true")
cmds+=(-n runtime-supervised "$RUNNER --supervised $root /bin/true")
if command -v runc >/dev/null; then
  mkdir -p "$W/bundle"
  (cd "$W/bundle" && runc spec && sed -i 's/"terminal": true/"terminal": false/; s#"sh"#"/bin/true"#' config.json)
  cp -a "$root" "$W/bundle/rootfs"
  cmds+=(-n runc "runc --root $W/runc run --bundle $W/bundle moatbench-$$")
fi
hyperfine -N --warmup 3 --runs "$RUNS" --export-json "$W/result.json" "${cmds[@]}" >&2
python3 - "$W/result.json" <<'PY'
import json, sys
r = {x["command"]: x for x in json.load(open(sys.argv[1]))["results"]}
goal = {"cli": 20, "cli-domain": 40}
print(f"{'command':20} {'median ms':>10} {'mean ms':>9} {'x runtime':>10}  goal")
base = r["runtime-supervised"]["median"]
for name, x in r.items():
    g = f"<= {goal[name]} ms" if name in goal else ""
    print(f"{name:20} {x['median']*1000:10.2f} {x['mean']*1000:9.2f} {x['median']/base:10.2f}  {g}")
PY
