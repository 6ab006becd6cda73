#!/bin/sh
# Ruleset render/apply time and size for 10 and 200 domains (2 machines, 2 policies each).
# Apply needs root + nft; it uses a table with a unique per-run name and deletes it.
set -e
cd "$(dirname "$0")/../.."
exec cargo bench -p moat-net --bench net
