#!/usr/bin/env bash
# The release build of moat's binaries, each linked statically (static-pie:
# still position independent, so ASLR is kept): target/release/moat,
# moat-supervisor and moat-init. Used by install.sh and the benchmarks.
#
# Why static: the CLI and the supervisor each start once per `moat run`, one
# after the other. Without shared libraries to load and relocate they start
# sooner: `moat run --rm busybox -- true` took 1.4-1.9 ms less (A/B medians of
# 80-100 alternating runs on the 2-core test host; docs/runtime.md).
# The price: a glibc or libseccomp security update needs a rebuild
# (`sudo ./install.sh`) to reach moat.
set -euo pipefail
cd "$(dirname "$0")/.."
# libseccomp-sys links libseccomp.a instead of the shared library (from
# libseccomp-dev, which scripts/deps.sh installs).
export LIBSECCOMP_LINK_TYPE=static
LIBSECCOMP_LIB_PATH=$(pkg-config --variable=libdir libseccomp 2>/dev/null || true)
export LIBSECCOMP_LIB_PATH=${LIBSECCOMP_LIB_PATH:-/usr/lib/$(gcc -print-multiarch)}
[[ -f $LIBSECCOMP_LIB_PATH/libseccomp.a ]] || {
  echo "error: no libseccomp.a in $LIBSECCOMP_LIB_PATH: install libseccomp-dev (scripts/deps.sh)" >&2
  exit 1
}
for bin in moat-cli:moat moat-runtime:moat-supervisor moat-init:moat-init; do
  cargo rustc --release --locked -p "${bin%%:*}" --bin "${bin#*:}" -- -C target-feature=+crt-static
done
