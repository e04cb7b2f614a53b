#!/usr/bin/env bash
# Soak test (docs/testing.md): 512 connections on 32 exports doing fio-verified I/O for
# ten minutes, with the server's memory and descriptors sampled. Installs fio and
# libnbd when missing, builds thinbd in release mode, prints one JSON line of figures.
# Usage: tools/soak.sh [--seconds S] [--connections N] [--exports E]
set -euo pipefail
cd "$(dirname "$0")/.."
tools/ensure-deps.sh bench
swift build -c release --product thinbd
exec /usr/bin/python3 tools/soak.py .build/release/thinbd "$@"
