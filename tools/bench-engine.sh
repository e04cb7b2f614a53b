#!/usr/bin/env bash
# Runs the engine benchmarks (Benchmarks/EngineBenchmarks) with ordo-one/benchmark.
# Builds a 10 GiB sparse pool under $TMPDIR (default /tmp) with 8 GiB mapped.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/ensure-deps.sh build
export THINBD_BENCHMARKS=1
exec swift package --scratch-path .build-bench --allow-writing-to-package-directory benchmark --target EngineBenchmarks "$@"
