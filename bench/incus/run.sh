#!/usr/bin/env bash
# Applying N busybox containers through moat's `incus` driver vs a loop of
# `incus launch` doing the same (same image, one project, a bridge with static
# addresses), ROUNDS times each; prints medians and the overhead ratio. The
# domain's network, project and firewall exist before each round on both sides.
#   cargo build -p moat-cli            (or --release; MOAT_BIN picks the binary)
#   scripts/incus-env.sh start
#   sudo bench/incus/run.sh [N] [ROUNDS]
# Uses its own moat root, subnet base 10.188 (domain 10.189.0.0/24), 10.183.99.0/24 for the loop and Incus project/bridge names of its
# own, and removes all of them on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
MOAT=${MOAT_BIN:-$TARGET/release/moat}
[[ -x $MOAT ]] || MOAT=$TARGET/debug/moat
[[ -x $MOAT ]] || { echo "missing moat binary: cargo build -p moat-cli" >&2; exit 2; }
N=${1:-10}
ROUNDS=${2:-3}
[[ $EUID -eq 0 ]] || { echo "needs root" >&2; exit 2; }
incus query /1.0 >/dev/null 2>&1 || { echo "incusd not running: scripts/incus-env.sh start" >&2; exit 2; }

W=$(mktemp -d /tmp/moat-bench-incus.XXXX)
chmod 755 "$W"
R=$W/r
P=$W/p
mkdir -p "$P"
IP_FORWARD=$(sysctl -n net.ipv4.ip_forward)
BP=moatbench-loop
BN=mbench0
m() { "$MOAT" --root "$R" -f "$P" --color never "$@"; }

loop_cleanup() {
  for i in $(incus list --project "$BP" -f csv -c n 2>/dev/null || true); do
    incus delete -f --project "$BP" "$i" >/dev/null 2>&1 || true
  done
}
cleanup() {
  set +e
  m destroy --all --force >/dev/null 2>&1
  loop_cleanup
  incus profile device remove --project "$BP" default eth0 >/dev/null 2>&1
  incus project delete "$BP" >/dev/null 2>&1
  incus network delete "$BN" >/dev/null 2>&1
  scripts/incus-env.sh cleanup >/dev/null 2>&1
  sysctl -qw net.ipv4.ip_forward="$IP_FORWARD"
  rm -rf "$W"
}
trap cleanup EXIT

{
  echo "schema_version: 1"
  echo "project: bench-incus"
  echo 'addressing: {base: "10.188", zone_step: 1}'
  echo "defaults: {driver: {container: incus}}"
  echo "domains:"
  echo "  bench:"
  echo "    trust_level: trusted"
  echo "    egress: none"
  echo "    machines:"
  for i in $(seq 1 "$N"); do echo "      m$i: {}"; done
} >"$P/moat.yml"

# Network, project, firewall and image first, so both sides only create containers.
m apply >/dev/null
destroy_machines() {
  for i in $(seq 1 "$N"); do m destroy "bench-m$i" --force >/dev/null; done
}
destroy_machines

incus network create "$BN" ipv4.address=10.183.99.254/24 ipv4.nat=false ipv6.address=none \
  ipv4.dhcp.ranges=10.183.99.100-10.183.99.253 ipv4.firewall=false raw.dnsmasq=no-resolv >/dev/null
incus project create "$BP" -c features.images=false -c features.profiles=true >/dev/null
incus profile device add --project "$BP" default root disk path=/ pool=default >/dev/null
incus profile device add --project "$BP" default eth0 nic network="$BN" name=eth0 >/dev/null

now() { date +%s.%N; }
moat_t=()
loop_t=()
for r in $(seq 1 "$ROUNDS"); do
  t0=$(now); m apply >/dev/null; t1=$(now)
  moat_t+=("$(echo "$t1 - $t0" | bc)")
  destroy_machines
  t0=$(now)
  for i in $(seq 1 "$N"); do
    incus launch busybox --project "$BP" "c$i" -d "eth0,ipv4.address=10.183.99.$i" >/dev/null
  done
  t1=$(now)
  loop_t+=("$(echo "$t1 - $t0" | bc)")
  loop_cleanup
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
mm=$(median "${moat_t[@]}")
ml=$(median "${loop_t[@]}")
echo "containers: $N, rounds: $ROUNDS"
echo "moat apply (incus driver): median ${mm} s  [${moat_t[*]}]"
echo "incus launch loop:         median ${ml} s  [${loop_t[*]}]"
echo "overhead ratio moat/loop:  $(echo "scale=2; $mm / $ml" | bc)"
