#!/usr/bin/env bash
# Fuzzes the NBD decoders and handshake (tools/nbd-fuzz) in release mode.
# Usage: tools/fuzz-nbd.sh [ITERATIONS (default 1000000)] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
tools/ensure-deps.sh build
swift build -c release --product nbd-fuzz
exec .build/release/nbd-fuzz "${1:-1000000}" "${2:-1}"
