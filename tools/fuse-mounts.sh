# Shell helpers for scripts that mount an ext4 image through nbdfuse and a loop device.
# Sourced by tools/ci-example.sh, tools/bench-origin.sh and the interop tests' scripts.

# Unmounts the loop-mounted file system at $1 and waits until no loop device holds its
# image $2. The loop device lets go of the file after umount has returned; unmounting
# the nbdfuse directory before that fails with "target is busy".
unmount_loop() {
    local mount_point=$1 image=$2
    umount "$mount_point" || return 1
    for _ in $(seq 100); do
        [ -z "$(losetup -j "$image" 2>/dev/null)" ] && return 0
        sleep 0.1
    done
    echo "$image: still held by a loop device 10 s after umount" >&2
    return 1
}

# Unmounts the nbdfuse directory $1, retrying while it is busy, then waits for nbdfuse
# (pid $2, when given; a child of this shell). When it stays busy (or never got
# mounted) for 5 s, nbdfuse is stopped by its pid, so that nothing waits for it forever,
# and the call fails.
unmount_fuse() {
    local dir=$1 pid=${2:-}
    for _ in $(seq 50); do
        if umount "$dir" 2>/dev/null; then
            [ -z "$pid" ] || wait "$pid"
            return
        fi
        sleep 0.1
    done
    echo "$dir: could not be unmounted for 5 s" >&2
    if [ -n "$pid" ]; then
        kill "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    fi
    return 1
}
