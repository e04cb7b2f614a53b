#!/usr/bin/python3
"""Power-cut images without device mapper: a user-space dm-log-writes.

Usage: tools/powercut.py THINBD [--writes N] [--seed S] [--serve-args "ARGS"] [--step K]
                          [--keep-after-flush] [--flush-every N] [--pace SECONDS]

Root only (loop devices, mount). It builds this stack in a private directory:

    thinbd serve --cache writeback -> ext4 -> loop device -> nbdfuse file
      -> nbdkit sh plugin (a 256 MiB disk that logs every write, with its data, and
         every FLUSH, in arrival order)

On that ext4 it creates a pool with a 16 MiB volume, writes it whole, snapshots it and
clones it, then snapshots the clone so that every block the scenario touches is shared:
each first write to a 64 KiB block is a copy-on-write copy. A libnbd client then writes N
random 4 KiB blocks of the clone with a FLUSH after every 8 (`--flush-every`) and notes
when each FLUSH returned; the server is killed with SIGKILL (by its own pid). `--pace`
spreads the writes over that many seconds, so that the server's auto-commit (each
second, with its lighter barriers) commits between FLUSHes; the summary says how many
commits the server made.

Then, for each device FLUSH in the log since the scenario began, the writes up to it are
replayed into an image, as a disk would hold them after a power cut just before the next
device FLUSH. Each image is mounted (ext4 replays its journal) and must pass `thinbd check`,
and every 512-byte sector of the clone must hold what the last client FLUSH returned
before that cut made durable (the golden image's bytes where nothing was written), or a
write made after that FLUSH (a write in flight may be torn by sector). `--serve-args "--no-flush '*'"` shows the check
failing when FLUSH makes nothing durable.

With `--keep-after-flush` each image also holds a random subset of the writes logged
between its flush and the next one (each kept with a probability drawn per image), as a
disk with a write cache may have stored some of them, in any order, when power went. That
is where a missing barrier shows: a superblock that reached the disk before the metadata
it names. Without it, every image is a prefix of the log at a flush.
"""
import argparse
import collections
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import nbd

DISK_SIZE = 256 << 20
VOLUME_SIZE = 16 << 20
BLOCK = 4096
SECTOR = 512

RECORDER = r"""#!/bin/bash
# nbdkit sh plugin: a disk in $D/img that logs each write (offset, length, where its data
# went in $D/data) and each flush (with the time) to $D/log. nbdkit runs a sh plugin's
# requests one at a time, so the log is in arrival order.
D=%(dir)s
case "$1" in
  get_size) echo %(size)d ;;
  can_write|can_flush) exit 0 ;;
  pread) dd if=$D/img skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none ;;
  pwrite)
    pos=$(stat -c %%s $D/data)
    tee -a $D/data | dd of=$D/img seek=$4 conv=notrunc oflag=seek_bytes status=none
    echo "W $4 $3 $pos" >> $D/log ;;
  flush) echo "F $(date +%%s.%%N)" >> $D/log ;;
  *) exit 2 ;;
esac
"""


def run(*command, check=True):
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()}")
    return result


def wait_for(path, process, what):
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


def serve(thinbd, pool, sock, extra):
    if os.path.exists(sock):
        os.remove(sock)
    server = subprocess.Popen([thinbd, "serve", pool, "--socket", sock, "--cache", "writeback", "--control", sock + ".control"] + extra,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(sock, server, "thinbd serve")
    return server


def scenario(sock, writes, seed, flush_every=8, pace=0.0):
    """Random 4 KiB writes with a FLUSH every `flush_every`; per FLUSH, when it returned,
    every block's durable value and how many writes came before it; and every write."""
    handle = nbd.NBD()
    handle.connect_uri(f"nbd+unix:///c?socket={sock}")
    rng = random.Random(seed)
    durable, pending, flushes, written = {}, [], [], []
    for i in range(writes):
        block = rng.randrange(VOLUME_SIZE // BLOCK)
        value = (i * 7 + seed) % 250 + 1
        handle.pwrite(bytes([value]) * BLOCK, block * BLOCK)
        pending.append((block, value))
        written.append((block, value))
        if pace:
            time.sleep(pace / writes)
        if i % flush_every == flush_every - 1:
            handle.flush()
            for b, v in pending:
                durable[b] = v
            pending.clear()
            flushes.append((time.time(), dict(durable), i + 1))
    handle.shutdown()
    return flushes, written


def replay(work, thinbd, start, flushes, written, step, keep_after_flush=False, seed=0):
    lines = open(os.path.join(work, "log")).read().split("\n")
    device_flushes = [i for i, line in enumerate(lines) if line.startswith("F")]
    cuts = [i for i in device_flushes if i < start][-1:] + [i for i in device_flushes if i >= start]
    image_path, mount_point, exported = (os.path.join(work, name) for name in ("replay.img", "replay", "c.raw"))
    os.makedirs(mount_point, exist_ok=True)
    tested, failures, newest_checked = 0, [], -1
    with open(os.path.join(work, "data"), "rb") as data:
        for n, cut in enumerate(cuts):
            if n % step and n != len(cuts) - 1:
                continue
            # The power cut comes just before the next device flush: every client FLUSH that
            # returned before then must be on the disk.
            deadline = float(lines[cuts[n + 1]].split()[1]) if n + 1 < len(cuts) else float("inf")
            replayed = lines[:cut]
            if keep_after_flush:
                # Some of the writes the disk had taken before the next flush, in any order:
                # a subset, applied in log order (a later write over an earlier one wins, as
                # it would in the disk's cache).
                rng = random.Random(seed * 100003 + n)
                keep = rng.random()
                end = cuts[n + 1] if n + 1 < len(cuts) else len(lines)
                replayed = replayed + [line for line in lines[cut:end] if line.startswith("W") and rng.random() < keep]
            with open(image_path, "wb") as image:
                image.truncate(DISK_SIZE)
                for line in replayed:
                    if line.startswith("W"):
                        _, offset, count, position = line.split()
                        data.seek(int(position))
                        image.seek(int(offset))
                        image.write(data.read(int(count)))
            loop = run("losetup", "-f", "--show", image_path).stdout.strip()
            try:
                run("mount", loop, mount_point)
                try:
                    checked = run(thinbd, "check", os.path.join(mount_point, "pool"), check=False)
                    if checked.returncode != 0:
                        failures.append(f"cut at log line {cut}: check failed: {checked.stdout[-400:]}{checked.stderr[-400:]}")
                    returned = [k for k, (when, _, _) in enumerate(flushes) if when < deadline]
                    if returned:
                        k = returned[-1]
                        newest_checked = max(newest_checked, k)
                        if os.path.exists(exported):
                            os.remove(exported)
                        exporting = run(thinbd, "export", os.path.join(mount_point, "pool"), "c", exported, check=False)
                        if exporting.returncode != 0:
                            failures.append(f"cut at log line {cut}: export failed: {exporting.stderr.strip()[-400:]}")
                        else:
                            with open(exported, "rb") as volume:
                                contents = volume.read()
                            _, durable, before = flushes[k]
                            for block in range(VOLUME_SIZE // BLOCK):
                                # What the FLUSH made durable (the golden 255 where nothing was
                                # written: the rest of each copied block), or anything written
                                # there after it.
                                value = durable.get(block, 255)
                                allowed = {value} | {v for b, v in written[before:] if b == block}
                                chunk = contents[block * BLOCK:(block + 1) * BLOCK]
                                # A write the disk had not finished may be torn, sector by sector.
                                sectors = [chunk[i:i + SECTOR] for i in range(0, BLOCK, SECTOR)]
                                if any(sector[0] not in allowed or sector.count(sector[0]) != SECTOR for sector in sectors):
                                    held = ", ".join(f"{count} bytes of {byte}" for byte, count in
                                                     sorted(collections.Counter(chunk).items(), key=lambda item: -item[1])[:4])
                                    failures.append(f"cut at log line {cut}: block {block} holds {held}; flushed {value} "
                                                    f"(client FLUSH {k + 1}), allowed {sorted(allowed)}")
                                    if len(failures) <= 3:
                                        shutil.copy(image_path, f"{image_path}.{cut}")
                                    break
                finally:
                    run("umount", mount_point, check=False)
            finally:
                run("losetup", "-d", loop, check=False)
            tested += 1
    return tested, failures, newest_checked


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("thinbd")
    parser.add_argument("--writes", type=int, default=400)
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(2), "little"))
    parser.add_argument("--serve-args", default="")
    parser.add_argument("--step", type=int, default=1, help="test every K-th cut (the last always)")
    parser.add_argument("--flush-every", type=int, default=8, help="a client FLUSH after every N writes")
    parser.add_argument("--pace", type=float, default=0.0, help="spread the writes over this many seconds")
    parser.add_argument("--keep-after-flush", action="store_true",
                        help="each image also keeps a random subset of the writes up to the next flush")
    arguments = parser.parse_args()
    # A parent that waits for signals with sigwait (thinbd's tests) passes them on
    # blocked, and nbdkit would then never see the SIGTERM that stops it.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    thinbd = os.path.abspath(arguments.thinbd)
    work = tempfile.mkdtemp(prefix="thinbd-powercut-")
    fuse_dir, mount_point = os.path.join(work, "fuse"), os.path.join(work, "mnt")
    os.makedirs(fuse_dir)
    os.makedirs(mount_point)
    with open(os.path.join(work, "img"), "wb") as image:
        image.truncate(DISK_SIZE)
    open(os.path.join(work, "data"), "wb").close()
    open(os.path.join(work, "log"), "w").close()
    recorder_path = os.path.join(work, "recorder.sh")
    with open(recorder_path, "w") as recorder:
        recorder.write(RECORDER % {"dir": work, "size": DISK_SIZE})
    os.chmod(recorder_path, 0o755)

    disk_sock, fuse_file, sock = os.path.join(work, "disk.sock"), os.path.join(fuse_dir, "disk"), os.path.join(work, "s.sock")
    nbdkit = subprocess.Popen(["nbdkit", "-f", "-U", disk_sock, "sh", recorder_path],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fuse = loop = server = None
    mounted = False
    try:
        wait_for(disk_sock, nbdkit, "nbdkit")
        fuse = subprocess.Popen(["nbdfuse", fuse_file, "--unix", disk_sock], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_for(fuse_file, fuse, "nbdfuse")
        loop = run("losetup", "-f", "--show", fuse_file).stdout.strip()
        # 4 KiB blocks, as on any file system of a size worth serving (mkfs would pick
        # 1 KiB for a disk this small).
        run("mkfs.ext4", "-q", "-b", "4096", "-E", "lazy_itable_init=1,lazy_journal_init=1", loop)
        run("mount", loop, mount_point)
        mounted = True
        pool = os.path.join(mount_point, "pool")
        run(thinbd, "create", pool, "--size", "128M")
        run(thinbd, "volume", "create", pool, "base", "--size", f"{VOLUME_SIZE >> 20}M")
        server = serve(thinbd, pool, sock, [])
        handle = nbd.NBD()
        handle.connect_uri(f"nbd+unix:///base?socket={sock}")
        for offset in range(0, VOLUME_SIZE, 1 << 20):
            handle.pwrite(bytes([255]) * (1 << 20), offset)
        handle.flush()
        handle.shutdown()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        server = None
        run(thinbd, "snapshot", pool, "base@golden")
        run(thinbd, "clone", pool, "base@golden", "c")
        # Shared again: the scenario's first write into each block copies it.
        run(thinbd, "snapshot", pool, "c@before")
        start = len(open(os.path.join(work, "log")).read().split("\n")) - 1
        generation_before = json.loads(run(thinbd, "info", pool, "--json").stdout)["generation"]
        server = serve(thinbd, pool, sock, shlex.split(arguments.serve_args))
        flushes, written = scenario(sock, arguments.writes, arguments.seed, arguments.flush_every, arguments.pace)
        # Asked of the live server through its control socket.
        live = run(thinbd, "info", pool, "--json", "--control", sock + ".control").stdout
        commits = json.loads(live)["generation"] - generation_before
        os.kill(server.pid, signal.SIGKILL)  # by its own pid
        server.wait()
        server = None
    finally:
        if server is not None:
            os.kill(server.pid, signal.SIGKILL)
            server.wait()
        if mounted:
            run("umount", mount_point, check=False)
        if loop:
            run("losetup", "-d", loop, check=False)
        if fuse is not None:
            run("umount", fuse_dir, check=False)
            try:
                fuse.wait(timeout=10)
            except subprocess.TimeoutExpired:
                fuse.kill()
                fuse.wait()
        nbdkit.terminate()
        try:
            nbdkit.wait(timeout=20)
        except subprocess.TimeoutExpired:
            nbdkit.kill()  # by its own pid
            nbdkit.wait()

    tested, failures, newest = replay(work, thinbd, start, flushes, written, arguments.step, arguments.keep_after_flush,
                                      arguments.seed)
    kept = ", writes after each flush kept at random" if arguments.keep_after_flush else ""
    print(f"power cut: seed {arguments.seed}, {arguments.writes} writes{kept}, {len(flushes)} client FLUSHes; "
          f"{commits} commits by the server; {tested} images, {len(failures)} failed; "
          f"client FLUSHes checked up to {newest + 1} of {len(flushes)}")
    for failure in failures[:10]:
        print(failure)
    if not failures:
        shutil.rmtree(work)
    else:
        print(f"left in {work}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
