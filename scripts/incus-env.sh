#!/usr/bin/env bash
# A local incusd for moat's Incus tests and benchmarks (hosts without systemd).
#
#   scripts/incus-env.sh install   incus-base from bookworm-backports (Debian 12) if missing
#   scripts/incus-env.sh start     start incusd if it is not running; initialise it once
#   scripts/incus-env.sh stop      remove what moat's tests left (projects moat-*, their
#                                  instances, images, profiles, bridges mt*), stop incusd
#                                  if this script started it, restore net.ipv4.ip_forward
#   scripts/incus-env.sh status    prints "running" or "stopped"
#
# incusd is started with a proxy pointing at loopback (no image server is reachable and
# a startup task would otherwise try one); the preseed sets the same proxy in its config.
set -euo pipefail

state=/var/lib/moat-incus-env
sock=/var/lib/incus/unix.socket
incusd=/usr/libexec/incus/incusd

have_incusd() { [[ -x $incusd ]] && command -v incus >/dev/null 2>&1; }

running() {
  [[ -S $sock ]] && timeout 5 incus query /1.0 >/dev/null 2>&1
}

install() {
  if have_incusd; then return 0; fi
  if ! grep -qs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null; then
    src=/etc/apt/sources.list.d/debian.sources
    if [[ ! -f $src ]]; then
      echo "incus-env: $src not found; add bookworm-backports to apt's sources by hand" >&2
      return 1
    fi
    # Same mirror as the host's first entry, backports suite.
    awk 'BEGIN{RS="";ORS="\n\n"} NR==1{print}' "$src" |
      sed 's/^Suites:.*/Suites: bookworm-backports/' \
        >/etc/apt/sources.list.d/moat-bookworm-backports.sources
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports \
    --no-install-recommends incus-base dnsmasq-base >/dev/null
}

start() {
  mkdir -p "$state"
  if running; then
    echo "incus-env: incusd already running" >&2
    return 0
  fi
  if ! have_incusd; then
    echo "incus-env: incusd is not installed; run scripts/incus-env.sh install" >&2
    return 1
  fi
  sysctl -n net.ipv4.ip_forward >"$state/ip_forward"
  getent group incus-admin >/dev/null || groupadd --system incus-admin
  # No image server is reachable: point every proxy at a closed loopback port.
  HTTPS_PROXY=http://127.0.0.1:9 HTTP_PROXY=http://127.0.0.1:9 \
    setsid "$incusd" --group incus-admin --logfile="$state/incusd.log" \
    </dev/null >>"$state/incusd.out" 2>&1 &
  echo $! >"$state/incusd.pid"
  if ! "$incusd" waitready --timeout=60; then
    echo "incus-env: incusd did not become ready; see $state/incusd.log" >&2
    return 1
  fi
  if ! incus storage show default >/dev/null 2>&1; then
    incus admin init --preseed <<'EOF'
config:
  core.proxy_https: http://127.0.0.1:9
  core.proxy_http: http://127.0.0.1:9
  images.auto_update_interval: "0"
storage_pools:
- name: default
  driver: dir
profiles:
- name: default
  devices:
    root:
      path: /
      pool: default
      type: disk
EOF
  fi
}

# Everything moat's tests create carries the moat- prefix (projects) or is a bridge
# named mt<tag>-<domain> created through Incus.
cleanup() {
  running || return 0
  for p in $(incus project list -f csv -c n 2>/dev/null | sed 's/ (current)//' | grep '^moat-' || true); do
    for i in $(incus list --project "$p" -f csv -c n 2>/dev/null || true); do
      incus delete -f --project "$p" "$i" >/dev/null 2>&1 || true
    done
    for pr in $(incus profile list --project "$p" -f csv -c n 2>/dev/null | grep -v '^default$' || true); do
      incus profile delete --project "$p" "$pr" >/dev/null 2>&1 || true
    done
    incus project delete "$p" >/dev/null 2>&1 || true
  done
  for n in $(incus network list -f csv -c n,m 2>/dev/null | awk -F, '$2=="YES" && $1 ~ /^mt/ {print $1}' || true); do
    incus network delete "$n" >/dev/null 2>&1 || true
  done
}

stop() {
  cleanup
  if [[ -f $state/incusd.pid ]]; then
    pid=$(cat "$state/incusd.pid")
    if running; then
      timeout 30 incus admin shutdown >/dev/null 2>&1 || true
    fi
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      sleep 1
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$state/incusd.pid"
    # The firewall table our incusd made for its networks (all deleted
    # above); it makes it again when it next starts.
    if command -v nft >/dev/null; then nft delete table inet incus 2>/dev/null || true; fi
  fi
  if [[ -f $state/ip_forward ]]; then
    sysctl -qw net.ipv4.ip_forward="$(cat "$state/ip_forward")"
    rm -f "$state/ip_forward"
  fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  cleanup) cleanup ;;
  status) if running; then echo running; else echo stopped; fi ;;
  *) echo "usage: $0 install|start|stop|cleanup|status" >&2; exit 2 ;;
esac
