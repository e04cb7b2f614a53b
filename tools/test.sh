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

log=$(mktemp)
# Show failures and the runner's summary; the full log is kept on failure.
swift test --skip-build 2>&1 | tee "$log" | grep -vE '^(◇|↳|Test Case|Test Suite|✔ Test|✔ Suite)'
status=${PIPESTATUS[0]}
grep -E 'Test run with' "$log"
passed=$(grep -E '^✔ Test ' "$log" | grep -vc 'Test run with')
failed_tests=$(grep -cE '^✘ Test .* failed after' "$log")
if [ "$status" -eq 0 ]; then rm -f "$log"; else echo "full test log: $log"; fi
if [ "$status" -ne 0 ] && [ "$failed_tests" -eq 0 ]; then failed_tests=1; fi
echo "$passed passed, $failed_tests failed"
exit "$status"
