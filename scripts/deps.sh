#!/usr/bin/env bash
# Installs the host packages moat needs (Debian/Ubuntu, as root).
#   scripts/deps.sh          what `moat` needs at run time and to build it
#   scripts/deps.sh --test   plus what the test suite and benchmarks use
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

runtime=(
  nftables iproute2 busybox-static dnsmasq-base mmdebstrap
  libseccomp-dev pkg-config gcc make ca-certificates
  xz-utils
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

# VMs (driver qemu): QEMU from the suite of an installed qemu-utils (apt refuses to mix
# bookworm's 7.2 with backports' 10.0; in 10.0 SPICE is a separate module package), plus the
# tools that build VM disks and cloud-init seeds without loop mounts.
vm=(qemu-utils ovmf genisoimage syslinux syslinux-common syslinux-efi mtools dosfstools fdisk e2fsprogs)
qemu=(qemu-system-x86)
qemu_suite=()
if dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q bpo; then
  qemu+=(qemu-system-modules-spice)
  qemu_suite=(-t bookworm-backports)
fi
vm_missing=()
for p in "${vm[@]}" "${qemu[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || vm_missing+=("$p")
done
if ((${#vm_missing[@]})); then
  echo "installing: ${vm_missing[*]}" >&2
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${vm[@]}" >/dev/null
  apt-get install -y -qq --no-install-recommends "${qemu_suite[@]}" "${qemu[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found; install a Rust toolchain (rustup) first" >&2
  exit 1
fi
