#!/usr/bin/env bash
# Runs the whole test suite. As root it includes the privileged tests (network
# namespaces, nftables, containers); otherwise those skip and say why.
#   sudo ./test.sh
set -euo pipefail
cd "$(dirname "$0")"
if [[ $EUID -eq 0 ]]; then scripts/deps.sh --test; fi
cargo test --workspace --locked --no-fail-fast -- --test-threads=2 "$@"
