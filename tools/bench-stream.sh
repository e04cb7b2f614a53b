#!/usr/bin/env bash
# The send/receive benchmark (issue: changed blocks): an 8 GiB volume full of data with 1%
# of its blocks rewritten in 20 runs after a base snapshot, both pools served on Unix
# sockets. Measures `diff` (served and offline), the incremental stream's size against the
# changed bytes, and incremental send | receive against `qemu-img convert` of the whole
# image between the same two servers, in one run. Usage: tools/bench-stream.sh [REPEATS]
set -euo pipefail
cd "$(dirname "$0")/.."
tools/ensure-deps.sh bench
swift build -c release --product thinbd
exec /usr/bin/python3 tools/bench-stream.py .build/release/thinbd "$@"
