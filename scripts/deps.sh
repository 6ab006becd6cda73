#!/usr/bin/env bash
# Installs the host packages moat needs (Debian/Ubuntu, as root).
#   scripts/deps.sh          what `moat` needs at run time and to build it
#   scripts/deps.sh --test   plus what the test suite and benchmarks use
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

runtime=(
  nftables iproute2 busybox-static dnsmasq-base mmdebstrap
  libseccomp-dev pkg-config gcc make ca-certificates
)
testing=(
  iputils-ping netcat-openbsd socat python3 procps psmisc
  runc systemd-container docker-registry skopeo podman hyperfine
)

want=("${runtime[@]}")
if [[ "${1:-}" == "--test" ]]; then
  want+=("${testing[@]}")
fi

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Incus (the `incus` driver's tests): incus-base from bookworm-backports.
if [[ "${1:-}" == "--test" ]]; then
  "$(dirname "$0")/incus-env.sh" install || echo "warning: Incus not installed; its tests will skip" >&2
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found; install a Rust toolchain (rustup) first" >&2
  exit 1
fi
