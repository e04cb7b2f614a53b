#!/usr/bin/env bash
# Runs every test: unit, model-based, crash simulation, corruption and CLI tests.
# Installs what is missing first. Prints "N passed, M failed" last.
set -uo pipefail
cd "$(dirname "$0")/.."
tools/ensure-deps.sh test || exit 1

swift build --build-tests 2>&1 | tail -n 20
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
    echo "build failed"
    echo "0 passed, 1 failed"
    exit 1
fi

# Runs `swift test` with the given environment and filter arguments; adds to the
# totals and keeps the log of a failing run.
passed=0
failed_tests=0
overall=0
run_tests() {
    local label=$1
    shift
    local log
    log=$(mktemp)
    # Show failures and the runner's summary; the full log is kept on failure.
    env "$@" 2>&1 | tee "$log" | grep -vE '^(◇|↳|Test Case|Test Suite|✔ Test|✔ Suite)'
    local status=${PIPESTATUS[0]}
    echo "$label: $(grep -E 'Test run with' "$log" | tail -n 1)"
    local total ok bad
    # From the runner's own summary: counting the per-test lines undercounted when
    # tests running in parallel wrote into each other's lines.
    total=$(grep -E 'Test run with [0-9]+ tests?' "$log" | tail -n 1 | sed -E 's/.*Test run with ([0-9]+) tests?.*/\1/')
    bad=$(grep -cE '^✘ Test .* failed after' "$log")
    if [ "$status" -eq 0 ]; then rm -f "$log"; else echo "full test log: $log"; overall=1; fi
    if [ "$status" -ne 0 ] && [ "$bad" -eq 0 ]; then bad=1; fi
    ok=$(( ${total:-0} > bad ? ${total:-0} - bad : 0 ))
    passed=$((passed + ok))
    failed_tests=$((failed_tests + bad))
}

run_tests "all tests" swift test --skip-build
# The interop suites once more with every served connection left on swift-nio's
# channel pipeline after its handshake (`serve --transmission nio`); the first pass
# used the default, the lean loop.
run_tests "interop on the nio loop" THINBD_TEST_TRANSMISSION=nio swift test --skip-build --filter InteropTests
echo "$passed passed, $failed_tests failed"
exit "$overall"
