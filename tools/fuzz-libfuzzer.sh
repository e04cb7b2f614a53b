#!/usr/bin/env bash
# Coverage-guided fuzzing with libFuzzer (swiftc -sanitize=fuzzer) of the metadata block
# decoders, the superblock, the NBD server's parser, handshake and request validation
# (whole and byte by byte), the client handshake, and the control socket's line framer
# and request decoder (tools/fuzz/Fuzz.swift). A trap is a crash libFuzzer
# reports with the input that caused it (saved as crash-*).
# Usage: tools/fuzz-libfuzzer.sh [RUNS] [extra libFuzzer flags]   (default 1,000,000 runs)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-1000000}
shift || true
THINBD_FUZZ=1 swift build -c release --product thinbd-fuzz -Xswiftc -sanitize=fuzzer --build-path .build/fuzz 2>&1 | tail -n 1
corpus=.build/fuzz/corpus
mkdir -p "$corpus"
# A few seeds: an empty input per target, and a client that negotiates and reads.
for target in 0 1 2 3 4 5 6; do printf "\\x0$target" > "$corpus/seed-$target"; done
# Crash inputs (crash-*) go next to the corpus, not into the work tree.
.build/fuzz/release/thinbd-fuzz -runs="$runs" -max_len=8192 -artifact_prefix=.build/fuzz/ "$@" "$corpus"
