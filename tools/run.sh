#!/usr/bin/env bash
# Builds thinbd (release) and serves the default pool over NBD on 127.0.0.1:10809.
# The pool ($THINBD_POOL, else ~/.local/share/thinbd/default.pool) is created on first
# use: 10 GiB of data capacity (sparse) with one 10 GiB volume, "disk", which is also the
# default export. Extra arguments go to `thinbd serve` (e.g. --socket /tmp/nbd.sock).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/ensure-deps.sh build
swift build -c release --product thinbd
thinbd=.build/release/thinbd
pool=${THINBD_POOL:-$HOME/.local/share/thinbd/default.pool}
if [ ! -e "$pool" ]; then
    mkdir -p "$(dirname "$pool")"
    "$thinbd" create "$pool" --size 10G
    "$thinbd" volume create "$pool" disk --size 10G
fi
exec "$thinbd" serve "$pool" --default-export disk "$@"
