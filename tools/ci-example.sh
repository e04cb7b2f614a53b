#!/usr/bin/env bash
# A CI runner without LVM, on thinbd: a golden ext4 buildroot is prepared once and
# snapshotted; then N builds run at once, each on its own ephemeral clone of the
# snapshot (made when the build connects, gone after it disconnects), mounted through
# nbdfuse and a loop device. Each build's file system is checked with e2fsck afterwards,
# and the same builds run on local disk for comparison.
#
# Usage: tools/ci-example.sh [--builds N] [--files N] [--size SIZE]
#   --builds N   builds at once (default 4)
#   --files N    C files in the synthetic project (default 200)
#   --size SIZE  size of the buildroot volume (default 1G)
# Needs root (mount), nbdfuse (libnbd-bin), e2fsprogs, gcc and make. THINBD=PATH picks
# the thinbd binary (default: a release build, made if missing).
set -euo pipefail

builds=4 files=200 size=1G
while [ $# -gt 0 ]; do
    case "$1" in
        --builds) builds=$2; shift 2 ;;
        --files) files=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 64 ;;
    esac
done

here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/tools/fuse-mounts.sh"
for tool in nbdfuse mkfs.ext4 e2fsck gcc make mount umount; do
    command -v "$tool" >/dev/null || { echo "ci-example: $tool is missing" >&2; exit 2; }
done
[ "$(id -u)" -eq 0 ] || { echo "ci-example: needs root for mount -o loop" >&2; exit 2; }
if [ -z "${THINBD:-}" ]; then
    THINBD=$here/.build/release/thinbd
    [ -x "$THINBD" ] || (cd "$here" && swift build -c release --product thinbd >&2)
fi

work=$(mktemp -d /tmp/thinbd-ci.XXXXXX)
pool=$work/pool
socket=$work/nbd.sock
server=""
fuses=()
mounts=()
cleanup() {
    set +e
    for m in "${mounts[@]}"; do mountpoint -q "$m" && umount "$m"; done
    for f in "${fuses[@]}"; do mountpoint -q "$f" && umount "$f"; done
    [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# Attaches export $1 at $2/disk through nbdfuse; prints nothing, waits until it is there.
attach() {
    mkdir -p "$2"
    nbdfuse "$2/disk" "nbd+unix:///$1?socket=$socket" &
    fuses+=("$2")
    for _ in $(seq 100); do [ -e "$2/disk" ] && return 0; sleep 0.05; done
    echo "ci-example: nbdfuse did not attach $1" >&2
    return 1
}

# The synthetic project: $files C files and a Makefile; the program prints a checksum.
make_project() {
    local dir=$1
    mkdir -p "$dir/src"
    for i in $(seq 1 "$files"); do
        cat >"$dir/src/f$i.c" <<C
unsigned long f$i(unsigned long x) {
    unsigned long h = x ^ $i;
    for (int r = 0; r < 64; r++) h = h * 6364136223846793005UL + 1442695040888963407UL + (h >> 29);
    return h;
}
C
    done
    {
        echo "unsigned long combine(unsigned long x) { unsigned long h = x;"
        for i in $(seq 1 "$files"); do echo "    extern unsigned long f$i(unsigned long); h ^= f$i(h);"; done
        echo "    return h; }"
        echo '#include <stdio.h>'
        echo 'int main(void) { printf("%lx\n", combine(42)); return 0; }'
    } >"$dir/src/main.c"
    cat >"$dir/Makefile" <<'MK'
SRC := $(wildcard src/*.c)
OBJ := $(SRC:src/%.c=obj/%.o)
all: out/app out/artifacts.tar
obj/%.o: src/%.c | obj
	gcc -O1 -c $< -o $@
obj out:
	mkdir -p $@
out/app: $(OBJ) | out
	gcc $(OBJ) -o $@
out/artifacts.tar: out/app
	tar cf $@ obj out/app
	dd if=/dev/zero of=out/scratch bs=1M count=16 status=none
	sync
MK
}

# One build in directory $1: make, run the program; prints its output.
run_build() {
    make -s -C "$1" -j2 >/dev/null && "$1/out/app"
}

echo "thinbd ci-example: $builds builds of a $files-file C project; work directory $work"
"$THINBD" create "$pool" --size 16G >/dev/null
"$THINBD" volume create "$pool" buildroot --size "$size" >/dev/null
"$THINBD" serve "$pool" --socket "$socket" --ephemeral 'build-*=buildroot@golden' --no-flush 'build-*' \
    --ephemeral-grace 1 >/dev/null 2>"$work/serve.log" &
server=$!
for _ in $(seq 100); do [ -S "$socket" ] && [ -S "$pool.control" ] && break; sleep 0.05; done

# 1. The golden buildroot, once: ext4 with the project in it, then a snapshot.
t0=$(now)
attach buildroot "$work/fuse-golden"
mkfs.ext4 -q -F "$work/fuse-golden/disk"
mkdir -p "$work/golden"
mount -o loop "$work/fuse-golden/disk" "$work/golden"
mounts+=("$work/golden")
make_project "$work/golden/project"
unmount_loop "$work/golden" "$work/fuse-golden/disk"
e2fsck -fn "$work/fuse-golden/disk" >/dev/null 2>&1
unmount_fuse "$work/fuse-golden"
t1=$(now)
"$THINBD" snapshot "$pool" buildroot@golden >/dev/null
t2=$(now)
echo "golden buildroot prepared in $(elapsed "$t0" "$t1") s; snapshot taken in $(elapsed "$t1" "$t2") s (while served)"
# Data space used: the top-level "used_bytes" of info --json (two spaces in; the metadata
# object has one of its own).
used_now() { "$THINBD" info "$pool" --json | awk -F' : ' '/^  "used_bytes"/ { gsub(/,/, "", $2); print $2; exit }'; }
used_before=$(used_now)

# 2. N builds at once, each on its own ephemeral clone.
build_on_clone() {
    local i=$1 dir=$work/clone-$i
    local start end
    start=$(now)
    attach "build-$i" "$dir/fuse" || return 1
    mkdir -p "$dir/root"
    mount -o loop "$dir/fuse/disk" "$dir/root"
    run_build "$dir/root/project" >"$dir/output"
    unmount_loop "$dir/root" "$dir/fuse/disk"
    end=$(now)
    if e2fsck -fn "$dir/fuse/disk" >"$dir/fsck" 2>&1; then echo clean >"$dir/fsck-status"; else echo DAMAGED >"$dir/fsck-status"; fi
    unmount_fuse "$dir/fuse"
    elapsed "$start" "$end" >"$dir/seconds"
}
t3=$(now)
pids=()
for i in $(seq 1 "$builds"); do
    mkdir -p "$work/clone-$i"
    mounts+=("$work/clone-$i/root")
    fuses+=("$work/clone-$i/fuse")
    build_on_clone "$i" & pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
t4=$(now)

# 3. The same builds on local disk.
local_build() {
    local dir=$work/local-$1 start end
    start=$(now)
    cp -a "$work/source-project" "$dir"
    run_build "$dir" >"$dir.output"
    end=$(now)
    elapsed "$start" "$end" >"$dir.seconds"
}
make_project "$work/source-project"
t5=$(now)
pids=()
for i in $(seq 1 "$builds"); do local_build "$i" & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
t6=$(now)

# 4. Report.
expected=$(cat "$work/local-1.output" 2>/dev/null || echo "?")
printf '\n%-8s %-18s %-16s %-10s %s\n' build "thinbd clone (s)" "local disk (s)" e2fsck output
for i in $(seq 1 "$builds"); do
    out=$(cat "$work/clone-$i/output" 2>/dev/null || echo missing)
    status=$(cat "$work/clone-$i/fsck-status" 2>/dev/null || echo "not run")
    [ "$status" = clean ] || failed=1
    [ "$out" = "$expected" ] || failed=1
    printf '%-8s %-18s %-16s %-10s %s\n' "$i" "$(cat "$work/clone-$i/seconds" 2>/dev/null || echo -)" \
        "$(cat "$work/local-$i.seconds" 2>/dev/null || echo -)" "$status" "$out"
done
echo "all $builds builds: $(elapsed "$t3" "$t4") s on thinbd clones, $(elapsed "$t5" "$t6") s on local disk (wall clock)"

# 5. The clones are gone after their grace period, and their space is back.
for _ in $(seq 100); do
    "$THINBD" volume list "$pool" | grep -q 'build-' || break
    sleep 0.1
done
if "$THINBD" volume list "$pool" | grep -q 'build-'; then
    echo "ephemeral clones were not deleted" >&2
    failed=1
fi
# Their space returns with the next commit (the server's auto-commit, within a second).
for _ in $(seq 50); do
    [ "$(used_now)" = "$used_before" ] && break
    sleep 0.1
done
used_after=$(used_now)
echo "pool data used: $used_before bytes before the builds, $used_after after (clones deleted)"
[ "$used_after" = "$used_before" ] || { echo "space not returned" >&2; failed=1; }
"$THINBD" check "$pool" | tail -1

kill "$server"; wait "$server" || true; server=""
if [ "$failed" -ne 0 ]; then
    echo "ci-example: FAILED" >&2
    cat "$work/serve.log" >&2
    exit 1
fi
echo "ci-example: ok"
