#!/usr/bin/env bash
# kill -9 crash rounds (Tests/InteropTests/scripts/crash_rounds.py) against a release
# server: each round serves a pool, verifies every flushed write of the rounds before,
# writes and flushes from two libnbd connections, and kills the server with SIGKILL (by
# its pid) at a random moment; `thinbd check` must be clean after each.
# Usage: tools/crash-rounds.sh [ROUNDS] [SEED]   (defaults: 200, a random seed)
set -euo pipefail
cd "$(dirname "$0")/.."
tools/ensure-deps.sh test
swift build -c release --product thinbd 2>&1 | tail -n 1
work=$(mktemp -d /tmp/thinbd-crash-rounds.XXXXXX)
trap 'rm -rf "$work"' EXIT
.build/release/thinbd create "$work/pool" --size 256M >/dev/null
.build/release/thinbd volume create "$work/pool" v --size 64M >/dev/null
start=$(date +%s)
/usr/bin/python3 Tests/InteropTests/scripts/crash_rounds.py .build/release/thinbd "$work/pool" "$work" "${1:-200}" ${2:+"$2"}
echo "took $(( $(date +%s) - start )) s"
