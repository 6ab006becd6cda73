#!/usr/bin/env bash
# The daemon: API round-trip latency of `GET /v1/status` with 100 machines
# (median, p99), against the real alternative measured in the same run: the
# in-process CLI `moat --no-daemon status` (and `moat status` routed through
# the daemon); the idle daemon's memory (VmRSS). Needs root and a build:
#   scripts/build-release.sh
#   sudo bench/daemon/run.sh [MACHINES]        (default 100)
# Env: MOAT_BIN (default $CARGO_TARGET_DIR/release/moat), BENCH_DIR (default /var/tmp),
#      N (API requests, default 200), NCLI (CLI runs, default 30).
# Uses its own root and subnets 10.191.x, and removes everything it made on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
MOAT=${MOAT_BIN:-$TARGET/release/moat}
export MOAT_SUPERVISOR=${MOAT_SUPERVISOR:-$(dirname "$MOAT")/moat-supervisor}
MACHINES=${1:-100}
N=${N:-200}
NCLI=${NCLI:-30}
for f in "$MOAT" "$MOAT_SUPERVISOR"; do
  [[ -x $f ]] || { echo "missing $f: scripts/build-release.sh" >&2; exit 2; }
done
[[ $EUID -eq 0 ]] || { echo "needs root" >&2; exit 2; }
command -v python3 >/dev/null || { echo "needs python3" >&2; exit 2; }

W=$(mktemp -d "${BENCH_DIR:-/var/tmp}/moat-bench-daemon.XXXX")
chmod 755 "$W"
R=$W/r
P=$W/p
mkdir -p "$P"
m() { "$MOAT" --root "$R" -f "$P" --color never "$@"; }
DPID=

cleanup() {
  set +e
  [[ -n $DPID ]] && kill "$DPID" 2>/dev/null
  m --no-daemon destroy --all --force >/dev/null 2>&1 || echo "destroy --all --force failed" >&2
  for pid in $(pgrep -f "$R/" || true); do kill -9 "$pid" 2>/dev/null || true; done
  sleep 0.2
  grep -F " $R/" /proc/mounts | awk '{print length($2), $2}' | sort -rn | cut -d' ' -f2- |
    while read -r mnt; do umount "$mnt" 2>/dev/null || umount -l "$mnt" || true; done
  rm -rf "$W"
}
trap cleanup EXIT

DOMAINS=4
PER=$(((MACHINES + DOMAINS - 1) / DOMAINS))
{
  echo "schema_version: 1"
  echo "project: bench-daemon"
  echo 'addressing: {base: "10.191", zone_step: 1}'
  echo "domains:"
  for d in $(seq 0 $((DOMAINS - 1))); do
    echo "  bd$d:"
    echo "    trust_level: trusted"
    echo "    egress: none"
    echo "    machines:"
    for i in $(seq 0 $((PER - 1))); do
      echo "      m$i: {}"
    done
  done
} >"$P/moat.yml"

echo "apply: $((DOMAINS * PER)) machines in $DOMAINS domains ..."
t0=$(date +%s.%N)
m --no-daemon apply -j 8 >/dev/null 2>&1
echo "  applied in $(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s"

"$MOAT" --root "$R" daemon --project "$P" --interval 3600 >"$W/daemon.out" 2>"$W/daemon.err" &
DPID=$!
for _ in $(seq 100); do grep -q "listening on" "$W/daemon.out" 2>/dev/null && break; sleep 0.05; done
SOCK=$(sed -n 's/^listening on //p' "$W/daemon.out")
[[ -S $SOCK ]] || { echo "daemon did not start:"; cat "$W/daemon.err"; exit 1; }
# Idle: after its first observation of the machines (it watches every 2 s).
sleep 5
rss() { awk '/^VmRSS/ {print $2}' "/proc/$DPID/status"; }
IDLE_RSS=$(rss)

python3 - "$SOCK" "$N" "$NCLI" "$MOAT" "$R" "$P" <<'PY'
import socket, statistics, subprocess, sys, time
sock, n, ncli, moat, root, proj = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:]

def api(path):
    s = socket.socket(socket.AF_UNIX)
    t = time.perf_counter()
    s.connect(sock)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: moat\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        data += b
    dt = time.perf_counter() - t
    s.close()
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    return dt, len(data)

def cli(args):
    t = time.perf_counter()
    subprocess.run([moat, "--root", root, "-f", proj, *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t

def stats(name, xs):
    xs = sorted(xs)
    med = statistics.median(xs)
    p99 = xs[min(len(xs) - 1, int(len(xs) * 0.99))]
    print(f"  {name:<44} median {med*1000:8.2f} ms   p99 {p99*1000:8.2f} ms   (n={len(xs)})")
    return med

print(f"latency of status ({n} API requests, {ncli} CLI runs):")
api("/v1/status")
_, size = api(f"/v1/status")
a = stats("API GET /v1/status (JSON, %d bytes)" % size, [api("/v1/status")[0] for _ in range(n)])
stats("API GET /v1/status?format=text", [api("/v1/status?format=text")[0] for _ in range(n)])
stats("API GET /v1/health", [api("/v1/health")[0] for _ in range(n)])
c = stats("CLI moat status (through the daemon)", [cli(["status"]) for _ in range(ncli)])
i = stats("CLI moat --no-daemon status (in-process)", [cli(["--no-daemon", "status"]) for _ in range(ncli)])
print(f"  ratio in-process CLI / API: {i/a:.2f}x   in-process CLI / CLI through daemon: {i/c:.2f}x")
PY
echo "daemon memory: idle VmRSS $IDLE_RSS kB (with $((DOMAINS * PER)) machines observed), after the runs $(rss) kB"
