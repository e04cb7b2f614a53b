#!/bin/bash
# A runner pool clones a golden ext4 image that another thinbd serves, over its Unix
# socket and over TCP on loopback, and uses it: mounted through nbdfuse and a loop
# device, written, checked with e2fsck; a raw clone is compared byte for byte with the
# origin plus its writes; then hydrated, after which it needs no origin.
# Runs inside `thinbd serve RUNNER --run` inside `thinbd serve ORIGIN --run` (both stop
# when it ends). Environment: T (thinbd), W (work directory), GS (origin socket),
# GPORT (origin TCP port), GMETRICS (the origin's metrics URL), RS (runner socket),
# RUNNER (runner pool, served with --ephemeral 'job-*=golden2').
set -euo pipefail
source "$(cd "$(dirname "$0")/../../.." && pwd)/tools/fuse-mounts.sh"
fuse="$W/fuse"
mnt="$W/mnt"
cleanup() {
    set +e
    mountpoint -q "$mnt" && unmount_loop "$mnt" "$fuse/disk"
    # Stops nbdfuse by its pid when its directory cannot be unmounted: waiting for it
    # instead hung the whole test run once.
    [ -n "${fusepid:-}" ] && unmount_fuse "$fuse" "$fusepid"
}
trap cleanup EXIT

# Attaches export $1 at $fuse/disk through nbdfuse (pid in fusepid).
attach() {
    nbdfuse "$fuse/disk" "nbd+unix:///$1?socket=$RS" &
    fusepid=$!
    for _ in $(seq 400); do [ -e "$fuse/disk" ] && return 0; sleep 0.05; done
    echo "nbdfuse did not attach $1 in 20 s" >&2
    return 1
}

"$T" clone "$RUNNER" "nbd+unix:///golden@v3?socket=$GS" build
"$T" clone "$RUNNER" "nbd://127.0.0.1:$GPORT/golden@v3" rawbuild

# ext4 on the clone, through nbdfuse and a loop mount.
mkdir -p "$fuse" "$mnt"
attach build
mount -o loop "$fuse/disk" "$mnt"
grep -qx golden "$mnt/etc/issue"
cmp "$mnt/blob" "$W/tree/blob"
dd if=/dev/urandom of="$mnt/new-artifact" bs=1M count=6 status=none
cp "$mnt/blob" "$mnt/blob-copy"
rm "$mnt/etc/issue"
sync
unmount_loop "$mnt" "$fuse/disk"
e2fsck -fn "$fuse/disk" >"$W/e2fsck.log" 2>&1 || { cat "$W/e2fsck.log"; exit 1; }
unmount_fuse "$fuse" "$fusepid"
fusepid=""
echo "ext4 on the clone: mounted, written, e2fsck clean"

# Raw writes on the TCP clone (whole blocks, parts of blocks, zeroes), then every byte.
qemu-io -f raw -c "write -P 0x5a 1M 64K" -c "write -P 0x5b 3000 5000" -c "write -z 2M 100K" \
    "nbd+unix:///rawbuild?socket=$RS" >/dev/null
nbdcopy "nbd+unix:///rawbuild?socket=$RS" "$W/rawbuild.img"
/usr/bin/python3 - "$W/golden.img" "$W/rawbuild.img" <<'PY'
import sys
expected = bytearray(open(sys.argv[1], "rb").read())
expected[1 << 20:(1 << 20) + 65536] = b"\x5a" * 65536
expected[3000:8000] = b"\x5b" * 5000
expected[2 << 20:(2 << 20) + 102400] = bytes(102400)
got = open(sys.argv[2], "rb").read()
assert len(got) == len(expected), (len(got), len(expected))
if got != expected:
    first = next(i for i in range(len(got)) if got[i] != expected[i])
    sys.exit(f"rawbuild differs from the origin plus its writes at byte {first}")
PY
echo "raw clone: the origin plus its writes, byte for byte"

# Ephemeral jobs on an origin-backed source: the first job's reads warm the source, so
# the second job reads the same file without a byte more from the origin.
origin_read_bytes() {
    /usr/bin/python3 -c 'import sys, urllib.request
text = urllib.request.urlopen(sys.argv[1]).read().decode()
print(sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith("thinbd_bytes_total{") and "op=\"read\"" in l))' "$GMETRICS"
}
"$T" clone "$RUNNER" "nbd://127.0.0.1:$GPORT/golden@v3" golden2
job() {
    attach "$1"
    mount -o loop,ro,noload "$fuse/disk" "$mnt"
    cmp "$mnt/blob" "$W/tree/blob"
    unmount_loop "$mnt" "$fuse/disk"
    unmount_fuse "$fuse" "$fusepid"
    fusepid=""
}
before=$(origin_read_bytes)
job job-1
after_first=$(origin_read_bytes)
job job-2
after_second=$(origin_read_bytes)
echo "origin bytes read: first job $(( ${after_first%.*} - ${before%.*} )), second job $(( ${after_second%.*} - ${after_first%.*} ))"
[ "${after_first%.*}" -gt "${before%.*}" ] || { echo "the first job read nothing from the origin"; exit 1; }
[ "${after_second%.*}" = "${after_first%.*}" ] || { echo "the second job read from the origin again"; exit 1; }
echo "ephemeral jobs: the second one fetched nothing"

"$T" check "$RUNNER" | grep -q clean
"$T" hydrate "$RUNNER" build
echo "hydrated: build needs no origin"
