#!/usr/bin/env bash
# The corruption fuzzer (Tests/ThinPoolTests/CorruptionFuzzTests.swift) for as many rounds
# as asked, in a release build: each round rewrites one field of a live metadata block
# with a hostile value and a valid CRC, then opens, checks, exports, reads, writes and
# commits the pool. A trap ends the run (the round and seed are printed just before); a
# round that runs over 60 s is reported as a hang and aborts.
# Usage: tools/fuzz-corruption.sh [ROUNDS] [SEED]   (defaults: 100000, a random seed)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-100000}
seed=${2:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
# Some test files use @testable imports: release builds need testing enabled.
swift build -c release -Xswiftc -enable-testing --build-tests 2>&1 | tail -n 1
echo "corruption fuzzer: $rounds rounds, seed $seed"
start=$(date +%s)
THINBD_FUZZ_ROUNDS=$rounds THINBD_FUZZ_SEED=$seed \
    swift test -c release -Xswiftc -enable-testing --skip-build --filter CorruptionFuzzTests 2>&1 \
    | grep -E 'corruption fuzzer|round hung|runtime failure|Fatal error|✘|Test run with'
status=${PIPESTATUS[0]}
echo "took $(( $(date +%s) - start )) s, exit status $status"
exit "$status"
