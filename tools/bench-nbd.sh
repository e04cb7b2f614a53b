#!/usr/bin/env bash
# The NBD data-path benchmark: thinbd beside qemu-nbd, nbdkit and the raw file in one run.
# Installs fio, qemu-utils, nbdkit and libnbd-bin when missing, builds thinbd in release
# mode, and prints a table (see docs/performance.md). Usage: tools/bench-nbd.sh [--runtime S]
set -euo pipefail
cd "$(dirname "$0")/.."
tools/ensure-deps.sh bench
swift build -c release --product thinbd
exec /usr/bin/python3 tools/bench-nbd.py .build/release/thinbd "$@"
