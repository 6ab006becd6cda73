#!/usr/bin/env bash
# `run --rm busybox -- true` through moat's runtime against unshare+chroot,
# runc, systemd-nspawn and podman, on the same busybox rootfs, in one
# hyperfine run (medians and ratios), plus one idle supervisor's RSS.
# podman gets explicit nofile/nproc ulimits (root here lacks CAP_SYS_RESOURCE)
# and no network, like the others: its default bridge would also put a NATed
# bridge and firewall rules on the host.
# Needs root, hyperfine, busybox-static; runc/nspawn/podman are skipped when absent.
# Build first: scripts/build-release.sh && cargo build --release -p moat-runtime --examples
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}/release
runner=$target/examples/run_once
export MOAT_SUPERVISOR=$target/moat-supervisor
runs=${RUNS:-30}
[ -x "$runner" ] || { echo "build first: scripts/build-release.sh && cargo build --release -p moat-runtime --examples" >&2; exit 1; }

work=$(mktemp -d /tmp/moat-bench-XXXXXX)
chmod 755 "$work"
img=moatbench-busybox-$$
# Plain systemd-nspawn started from a shell in the root cgroup makes
# payload/ and supervisor/ at the root of the hybrid hierarchies: remove the
# ones this run made (rmdir only: empty folders, never someone else's).
made_cg=()
for h in unified systemd; do
  for d in payload supervisor; do
    [ -e "/sys/fs/cgroup/$h/$d" ] || made_cg+=("/sys/fs/cgroup/$h/$d")
  done
done
cleanup() {
  podman rmi -f "$img" >/dev/null 2>&1 || true
  rm -rf "$work" /run/moat-bench
  for d in "${made_cg[@]}"; do
    [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
}
trap cleanup EXIT

root=$work/rootfs
mkdir -p "$root"/{bin,etc,proc,sys,dev,tmp,usr/lib}
cp /bin/busybox "$root/bin/"
chroot "$root" /bin/busybox --install -s /bin
echo 'ID=busybox' > "$root/usr/lib/os-release"
chmod 755 "$root"

cmds=(-n moat-runtime "$runner $root /bin/true")
cmds+=(-n moat-supervised "$runner --supervised $root /bin/true")
cmds+=(-n unshare-chroot "unshare --fork --pid --mount --uts --ipc --net --mount-proc chroot $root /bin/true")
if command -v runc >/dev/null; then
  mkdir -p "$work/bundle"
  (cd "$work/bundle" && runc spec && sed -i 's/"terminal": true/"terminal": false/; s#"sh"#"/bin/true"#' config.json)
  # runc's bundle rootfs is a copy: the moat runs shift the original's ownership.
  cp -a "$root" "$work/bundle/rootfs"
  cmds+=(-n runc "runc --root $work/runc run --bundle $work/bundle moatbench-$$")
fi
if command -v systemd-nspawn >/dev/null; then
  cp -a "$root" "$work/nspawn-root"
  cmds+=(-n systemd-nspawn "systemd-nspawn -q --register=no --keep-unit -D $work/nspawn-root /bin/true")
fi
if command -v podman >/dev/null; then
  tar -C "$root" -c . | podman import -q - "$img" >/dev/null
  cmds+=(-n podman "podman run --rm --network none --runtime runc --ulimit nofile=20000:20000 --ulimit nproc=4096:4096 $img /bin/true")
fi

hyperfine -N --warmup 3 --runs "$runs" --export-json "$work/result.json" "${cmds[@]}" >&2 || true
python3 - "$work/result.json" <<'PY'
import json, sys
r = {x["command"]: x for x in json.load(open(sys.argv[1]))["results"]}
base = r["moat-runtime"]["median"]
print(f"{'command':18} {'median ms':>10} {'x moat-runtime':>15}")
for name, x in r.items():
    print(f"{name:18} {x['median']*1000:10.2f} {x['median']/base:15.2f}")
if "podman" in r:
    print(f"podman / moat-supervised = {r['podman']['median']/r['moat-supervised']['median']:.1f}x")
PY

# Idle supervisor RSS: one machine running `sleep`.
dir=$work/machine
"$runner" --supervised "$root" /bin/true >/dev/null  # warm caches
python3 - "$dir" "$root" <<'PY'
import json, os, subprocess, sys, time
d, root = sys.argv[1], sys.argv[2]
os.makedirs(d, exist_ok=True)
spec = {"container": {"name": f"benchrss-{os.getpid()}", "rootfs": root, "kind": "application",
        "args": ["/bin/sleep", "1000"], "env": [], "cwd": "/", "user": [0, 0], "hostname": None,
        "limits": {"cpus": None, "memory": None, "pids": None},
        "idmap": {"host_id": 1000000 + 7 * 65536, "size": 65536}, "network": "none", "mounts": [],
        "privileged": False, "untrusted_domain": False, "etc_hosts": None, "resolv_conf": None,
        "stop_signal": None},
        "restart": "no", "max_restarts": None, "wait_for_start": False, "stop_timeout_ms": 200,
        "log_max_bytes": 10485760, "log_keep": 3}
json.dump(spec, open(f"{d}/supervisor.json", "w"))
subprocess.run([os.environ["MOAT_SUPERVISOR"], d], check=True)
for _ in range(500):
    try:
        st = json.load(open(f"{d}/status.json"))
        if st["phase"] == "running": break
    except Exception: pass
    time.sleep(0.01)
time.sleep(1)
pid = st["supervisor_pid"]
rss = [l for l in open(f"/proc/{pid}/status") if l.startswith(("VmRSS", "RssAnon", "RssFile"))]
print("idle supervisor:", " ".join(l.split(":")[0] + "=" + l.split(":")[1].strip() for l in rss))
os.kill(pid, 15)
for _ in range(500):
    if not os.path.exists(f"/proc/{pid}"): break
    time.sleep(0.01)
PY
