#!/usr/bin/env bash
# Builds thinbd and runs it on the default pool (created on first use).
# Until the NBD server lands this runs the engine demo: create, snapshot, clone, tree.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/ensure-deps.sh build
swift build -c release --product thinbd
exec .build/release/thinbd demo "$@"
