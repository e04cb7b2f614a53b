#!/usr/bin/env bash
# Installs the system packages thinbd needs to build and test, when they are missing.
# Usage: tools/ensure-deps.sh [build|test|bench]
set -euo pipefail

need=()
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

have libaio-dev || need+=(libaio-dev)
have liburing-dev || need+=(liburing-dev)
if [ "${1:-build}" = test ]; then
    # Real NBD clients the interop tests drive: qemu-img/qemu-io, nbdinfo/nbdcopy,
    # python3-libnbd (what nbdsh runs) and fio with its nbd engine.
    # systemd: systemd-analyze checks the shipped unit files. e2fsprogs, gcc and make:
    # tools/ci-example.sh (ext4 buildroots, builds on clones through nbdfuse).
    # openssl: the TLS tests make their certificates with it.
    for package in qemu-utils libnbd-bin python3-libnbd fio systemd e2fsprogs gcc make openssl; do
        have "$package" || need+=("$package")
    done
fi

if [ "${1:-build}" = bench ]; then
    for package in fio qemu-utils nbdkit libnbd-bin python3-libnbd openssl; do
        have "$package" || need+=("$package")
    done
fi

if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}" >&2
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null
fi
