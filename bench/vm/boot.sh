#!/usr/bin/env bash
# microVM boot overhead and idle memory (TCG on hosts without working KVM).
#   bench/vm/boot.sh [ROUNDS]     (root; needs a built `moat` and `moat-init` on PATH or
#                                  MOAT=path/to/moat, and a kernel: `moat kernel fetch` or MOAT_KERNEL)
# Prints the median time from launch to the guest workload's first output byte for
#  (a) `moat run --driver qemu busybox -- echo hi` (whole CLI: disk overlay, initramfs, tap-less)
#  (b) the same QEMU command line moat used, started bare (`qemu.args` of the run),
# their ratio (goal <= 1.1), and the RSS of an idle 128 MiB microVM's QEMU process.
set -euo pipefail
ROUNDS=${1:-5}
MOAT=${MOAT:-moat}
root=$(mktemp -d /tmp/moat-bench-vm.XXXXXX)
chmod 755 "$root"
export MOAT_ROOT=$root/root
cleanup() { "$MOAT" --root "$MOAT_ROOT" destroy --all --force >/dev/null 2>&1 || true; rm -rf "$root"; }
trap cleanup EXIT
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
now() { date +%s.%N; }

# Warm up: image, base disk, initramfs.
"$MOAT" --root "$MOAT_ROOT" kernel ls | grep -q . || "$MOAT" --root "$MOAT_ROOT" kernel fetch >/dev/null
"$MOAT" --root "$MOAT_ROOT" run --rm --driver qemu busybox -- echo warm >/dev/null

# Bare: replay a kept machine's QEMU command line (no sandbox/user, same devices).
"$MOAT" --root "$MOAT_ROOT" run -d --driver qemu --name bare busybox -- echo hi >/dev/null
run=$(find "$MOAT_ROOT" -path "*qemu/bare/qemu.args" 2>/dev/null | head -1)
[[ -n "$run" ]] || { echo "no qemu.args found" >&2; exit 1; }
pidf=$(dirname "$run")/qemu.pid
while [[ -s "$pidf" ]] && kill -0 "$(cat "$pidf")" 2>/dev/null; do sleep 0.2; done
mapfile -t args < "$run"
out=$(dirname "$run")/output.log

# Rounds alternate moat and bare, so a change in the host's load hits both alike.
moat_t=(); bare_t=()
for i in $(seq "$ROUNDS"); do
  t0=$(now)
  # The time of the first byte moat prints (the workload's output), not of its exit.
  "$MOAT" --root "$MOAT_ROOT" run --rm --driver qemu --name "b$i" busybox -- echo hi \
    | { head -c1 >/dev/null; now > "$root/first"; cat >/dev/null; }
  moat_t+=("$(echo "$(cat "$root/first") - $t0" | bc)")

  : > "$out"
  t0=$(now)
  qemu-system-x86_64 "${args[@]}" &
  pid=$!
  # The same event: the workload's first output byte (QEMU writes output.log).
  until [[ -s "$out" ]]; do sleep 0.01; done
  bare_t+=("$(echo "$(now) - $t0" | bc)")
  wait $pid || true
  echo "round $i: moat ${moat_t[-1]}s, bare ${bare_t[-1]}s" >&2
done

m=$(printf '%s\n' "${moat_t[@]}" | median)
b=$(printf '%s\n' "${bare_t[@]}" | median)
echo "first output: moat run ${m}s, bare qemu ${b}s, ratio $(echo "scale=2; $m / $b" | bc)"

# Idle memory: a 128 MiB microVM that sleeps.
"$MOAT" --root "$MOAT_ROOT" run -d --driver qemu --name idle busybox -- sleep 1000 >/dev/null
sleep 15
pidf=$(find "$MOAT_ROOT" -path "*qemu/idle/qemu.pid" 2>/dev/null | head -1)
pid=$(cat "$pidf")
rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
# The guest RAM is QEMU's one 128 MiB mapping; the rest is QEMU's own (binary and
# libraries, shared between QEMUs, plus its heap and the TCG code cache).
guest=$(awk '/^[0-9a-f]+-[0-9a-f]+ / {big=0} /^Size:/ {big=($2 >= 131072 && $2 <= 135168)}
  /^Rss:/ && big {r+=$2} END {print r+0}' "/proc/$pid/smaps")
file=$(awk '/^Pss_File:/ {print $2}' "/proc/$pid/smaps_rollup")
echo "idle 128 MiB microVM: QEMU RSS $((rss / 1024)) MiB = guest RAM resident $((guest / 1024)) MiB" \
  "+ QEMU's own $(((rss - guest) / 1024)) MiB (of which file-backed, shared: $((file / 1024)) MiB)"
