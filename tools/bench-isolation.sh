#!/usr/bin/env bash
# Isolation benchmark (docs/performance.md): a reader's 4 KiB QD1 latency on one export
# while other clients and commands load the server. Installs fio and libnbd when
# missing, builds thinbd in release mode, prints a Markdown table, and exits 1 when a
# target is missed. Usage: tools/bench-isolation.sh [--phase-seconds S] [--dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
tools/ensure-deps.sh bench
swift build -c release --product thinbd
exec /usr/bin/python3 tools/bench-isolation.py .build/release/thinbd "$@"
