#!/usr/bin/env bash
# A fleet runner on an origin: one thinbd serves a golden ext4 buildroot (golden@v3) over
# TCP on loopback; a runner's fresh pool clones it (`thinbd clone POOL nbd://...`) and
# serves build clones of it (--ephemeral 'build-*=golden'). Measured:
#   - bytes fetched from the origin against bytes the build touched (every read, write,
#     zero and trim a client sent, as the nbdkit log filter between the build and the
#     runner records them, merged into distinct bytes), and against the stricter "read"
#     (distinct bytes read before the build wrote them: what an origin may have to give);
#   - how soon the first build can start: cloning the origin against copying the whole
#     image first (`thinbd import` from the same export, which skips holes);
#   - the first and second build's times, and what the second one fetched;
#   - hydrating the rest afterwards: its time, what it fetched, the runner pool's use.
#
# Usage: tools/bench-origin.sh [--image-size SIZE] [--filler MiB] [--read-filler MiB] [--files N] [--block-size SIZE]
#   --image-size SIZE  the golden ext4 image (default 4G)
#   --filler MiB       data in the image besides the project ("the toolchain"; default 1536)
#   --read-filler MiB  how much of it each build reads, as a compiler reads its libraries
#                      (default 0)
#   --files N          C files in the build (default 200)
#   --block-size SIZE  the runner pool's block size (default 64K, thinbd's default)
# Needs root (mount), nbdfuse, nbdkit (log filter), e2fsprogs, gcc, make, curl.
# THINBD=PATH picks the binary (default: a release build, made if missing).
set -euo pipefail

image_size=4G filler=1536 read_filler=0 files=200 block_size=64K
while [ $# -gt 0 ]; do
    case "$1" in
        --image-size) image_size=$2; shift 2 ;;
        --filler) filler=$2; shift 2 ;;
        --read-filler) read_filler=$2; shift 2 ;;
        --files) files=$2; shift 2 ;;
        --block-size) block_size=$2; shift 2 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 64 ;;
    esac
done

here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/tools/fuse-mounts.sh"
for tool in nbdfuse nbdkit mkfs.ext4 e2fsck gcc make mount umount curl python3; do
    command -v "$tool" >/dev/null || { echo "bench-origin: $tool is missing" >&2; exit 2; }
done
[ "$(id -u)" -eq 0 ] || { echo "bench-origin: needs root for mount -o loop" >&2; exit 2; }
if [ -z "${THINBD:-}" ]; then
    THINBD=$here/.build/release/thinbd
    [ -x "$THINBD" ] || (cd "$here" && swift build -c release --product thinbd >&2)
fi

work=$(mktemp -d /tmp/thinbd-origin-bench.XXXXXX)
pids=()
mounts=()
cleanup() {
    set +e
    for m in "${mounts[@]}"; do mountpoint -q "$m" && umount "$m"; done
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
    # KEEP=1 keeps the logs and pools for a look afterwards.
    if [ -n "${KEEP:-}" ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
port=$((20000 + $$ % 20000))
metrics_port=$((port + 1))
wait_for() { for _ in $(seq 400); do [ -e "$1" ] && return 0; sleep 0.025; done; echo "bench-origin: $1 did not appear" >&2; return 1; }

# 1. The golden image: a project the build compiles, and filler it never reads.
echo "bench-origin: preparing a $image_size golden ext4 image ($filler MiB filler, $files C files) in $work"
tree=$work/tree
mkdir -p "$tree/usr/lib/toolchain" "$tree/project/src"
for i in $(seq 1 $((filler / 8))); do head -c $((8 << 20)) /dev/urandom >"$tree/usr/lib/toolchain/blob$i"; done
for i in $(seq 1 "$files"); do
    printf 'unsigned long f%d(unsigned long x) {\n    unsigned long h = x ^ %d;\n    for (int r = 0; r < 64; r++) h = h * 6364136223846793005UL + (h >> 29);\n    return h;\n}\n' "$i" "$i" >"$tree/project/src/f$i.c"
done
{
    echo "unsigned long combine(unsigned long h) {"
    for i in $(seq 1 "$files"); do echo "    extern unsigned long f$i(unsigned long); h ^= f$i(h);"; done
    echo '    return h; }'
    echo '#include <stdio.h>'
    echo 'int main(void) { printf("%lx\n", combine(42)); return 0; }'
} >"$tree/project/src/main.c"
printf 'SRC := $(wildcard src/*.c)\nOBJ := $(SRC:src/%%.c=obj/%%.o)\nall: out/app\nobj/%%.o: src/%%.c | obj\n\tgcc -O1 -c $< -o $@\nobj out:\n\tmkdir -p $@\nout/app: $(OBJ) | out\n\tgcc $(OBJ) -o $@\n\ttar cf out/artifacts.tar obj out/app\n' >"$tree/project/Makefile"
mkfs.ext4 -q -F -d "$tree" "$work/golden.img" "$image_size"
rm -rf "$tree"

"$THINBD" create "$work/origin" --size 8G >/dev/null
"$THINBD" import "$work/origin" golden "$work/golden.img" >/dev/null
rm -f "$work/golden.img"
"$THINBD" snapshot "$work/origin" golden@v3 >/dev/null
"$THINBD" serve "$work/origin" --listen "127.0.0.1:$port" --socket "$work/origin.sock" >"$work/origin.log" 2>&1 &
pids+=($!)
wait_for "$work/origin.sock"
origin_uri="nbd://127.0.0.1:$port/golden@v3"
mapped_golden=$("$THINBD" volume list "$work/origin" --json | python3 -c 'import json,sys; print(next(v["mapped_bytes"] for v in json.load(sys.stdin) if v["name"] == "golden@v3"))')

# One build through an nbdkit log proxy in front of export $2 of the runner at socket $1.
# Prints the build's seconds; the log is $3.
build() {
    local socket=$1 export=$2 log=$3 dir=$work/$2 start end
    mkdir -p "$dir/fuse" "$dir/root"
    start=$(now)
    nbdkit -f -U "$dir/proxy.sock" --filter=log nbd socket="$socket" export="$export" logfile="$log" &
    local proxy=$!
    pids+=("$proxy")
    wait_for "$dir/proxy.sock"
    nbdfuse "$dir/fuse/disk" "nbd+unix:///?socket=$dir/proxy.sock" &
    pids+=($!)
    wait_for "$dir/fuse/disk"
    mount -o loop "$dir/fuse/disk" "$dir/root"
    mounts+=("$dir/root")
    local blob
    for blob in $(seq 1 $((read_filler / 8))); do cat "$dir/root/usr/lib/toolchain/blob$blob" >/dev/null; done
    make -s -C "$dir/root/project" -j2 >/dev/null
    "$dir/root/project/out/app" >"$dir/output"
    unmount_loop "$dir/root" "$dir/fuse/disk"
    end=$(now)
    e2fsck -fn "$dir/fuse/disk" >/dev/null 2>&1 || { echo "bench-origin: e2fsck found damage on $export" >&2; exit 1; }
    unmount_fuse "$dir/fuse"
    kill "$proxy"; wait "$proxy" 2>/dev/null || true
    elapsed "$start" "$end"
}

# Distinct bytes of requests in an nbdkit log filter log, inside the image: "touched"
# counts every read, write, zero and trim; "read" only the bytes read before this build
# wrote them (the ones an origin could have to supply). Prints "TOUCHED READ".
touched() {
    python3 - "$1" "$2" <<'PY'
import re, sys
log, limit = sys.argv[1], int(sys.argv[2])
def merged(spans):
    spans.sort()
    out = []
    for start, stop in spans:
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], stop)
        elif stop > start:
            out.append([start, stop])
    return out
def minus(span, covered):
    # The parts of span outside the merged list covered.
    start, stop = span
    parts = []
    for a, b in covered:
        if b <= start or a >= stop:
            continue
        if a > start:
            parts.append((start, a))
        start = max(start, b)
    if stop > start:
        parts.append((start, stop))
    return parts
every, reads, written, covered = [], [], [], []
for line in open(log):
    m = re.search(r" (Read|Write|Zero|Trim) id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)", line)
    if not m:
        continue
    start = int(m.group(2), 16)
    span = (start, min(start + int(m.group(3), 16), limit))
    every.append(span)
    if m.group(1) == "Read":
        reads.extend(minus(span, covered))
    else:
        written.append(span)
        covered = merged(list(written))
size = lambda spans: sum(b - a for a, b in merged(spans))
print(size(every), size(reads))
PY
}
fetched() { curl -s "http://127.0.0.1:$metrics_port/metrics" | awk '/^thinbd_origin_bytes_fetched_total/ { print $2 }'; }
image_bytes=$("$THINBD" volume list "$work/origin" --json | python3 -c 'import json,sys; print(next(v["size"] for v in json.load(sys.stdin) if v["name"] == "golden@v3"))')

# 2. A runner that clones the origin.
t0=$(now)
"$THINBD" create "$work/runner" --size 8G --block-size "$block_size" >/dev/null
"$THINBD" clone "$work/runner" "$origin_uri" golden >/dev/null
"$THINBD" serve "$work/runner" --socket "$work/runner.sock" --ephemeral 'build-*=golden' --no-flush 'build-*' \
    --metrics "127.0.0.1:$metrics_port" >"$work/runner.log" 2>&1 &
pids+=($!)
wait_for "$work/runner.sock"
t1=$(now)
first=$(build "$work/runner.sock" build-1 "$work/build-1.log")
fetched_first=$(fetched)
read -r touched_first read_first < <(touched "$work/build-1.log" "$image_bytes")
second=$(build "$work/runner.sock" build-2 "$work/build-2.log")
fetched_second=$(( $(fetched) - fetched_first ))
read -r touched_second read_second < <(touched "$work/build-2.log" "$image_bytes")
cmp -s "$work/build-1/output" "$work/build-2/output" || { echo "bench-origin: the builds' outputs differ" >&2; exit 1; }
# Then the rest of the image in the background, through the server, as a runner would.
h0=$(now)
"$THINBD" hydrate "$work/runner" golden >/dev/null
h1=$(now)
hydrated_fetch=$(( $(fetched) - fetched_first - fetched_second ))
runner_used=$("$THINBD" info "$work/runner" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["used_bytes"])')

# 3. A runner that copies the whole image first.
t2=$(now)
"$THINBD" create "$work/copy" --size 8G --block-size "$block_size" >/dev/null
"$THINBD" import "$work/copy" golden "$origin_uri" >/dev/null
"$THINBD" serve "$work/copy" --socket "$work/copy.sock" --ephemeral 'build-*=golden' --no-flush 'build-*' >"$work/copy.log" 2>&1 &
pids+=($!)
wait_for "$work/copy.sock"
t3=$(now)
copied=$(build "$work/copy.sock" build-3 "$work/build-3.log")

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "-"; else printf "%.2f", a / b }'; }
start_clone=$(elapsed "$t0" "$t1")
start_copy=$(elapsed "$t2" "$t3")
echo
echo "golden@v3: $(mib "$image_bytes") image, $(mib "$mapped_golden") of it data; runner block size $block_size"
printf '%-44s %s\n' "first build can start after (clone)" "$start_clone s"
printf '%-44s %s\n' "first build can start after (full copy)" "$start_copy s ($(ratio "$start_copy" "$start_clone")x later)"
printf '%-44s %s\n' "first build on the clone" "$first s"
printf '%-44s %s\n' "second build on the clone" "$second s"
printf '%-44s %s\n' "build on the full copy" "$copied s"
printf '%-44s %s\n' "first build: bytes touched / read first" "$(mib "$touched_first") / $(mib "$read_first")"
printf '%-44s %s\n' "first build: bytes fetched" "$(mib "$fetched_first") ($(ratio "$fetched_first" "$touched_first")x touched, $(ratio "$fetched_first" "$read_first")x read)"
printf '%-44s %s\n' "hydrating the rest (through the server)" "$(elapsed "$h0" "$h1") s, $(mib "$hydrated_fetch") fetched; runner pool data used $(mib "$runner_used")"
printf '%-44s %s\n' "second build: bytes touched / read / fetched" "$(mib "$touched_second") / $(mib "$read_second") / $(mib "$fetched_second")"
