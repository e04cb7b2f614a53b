#!/usr/bin/env python3
"""How far the disk lets a fresh clone's cold writeback random writes go.

The cold `4k randwrite QD32` job of tools/bench-nbd.sh on a fresh clone makes every first
write to a 64 KiB block read the old block from a cold disk and write the copy, and the
auto-commit makes each second's copies durable (a cache flush). nbdkit's file plugin,
the peer of that job, writes into its page cache and touches no disk. This measures, in
interleaved rounds with caches dropped before every job:

- the clone's job as bench-nbd.py runs it (2 s ramp, then the window), and its copy
  phase: how long the server took for 99 % of its copies and at what rate (its
  Prometheus counter, sampled every quarter second), and what the disk under the pool
  moved and how busy it was meanwhile (/proc/diskstats);
- the same job on a volume that shares nothing (no copies: the in-place rate);
- nbdkit's file plugin on a raw file;
- the disk's own copy rate: fio reading 16,384 random 64 KiB blocks of a file and
  writing 16,384, at QD32 with O_DIRECT, then fdatasync (the copy, and the flush that
  makes it durable, which this VM's disk charges by the byte);
- the ideal copier's bound: a simulated server whose only costs are that disk copy rate
  (a FIFO disk) and the measured in-place rate, under the same client (QD32, 4 KiB
  random writes over 16,384 blocks, 2 s ramp). No server that copies whole 64 KiB
  blocks and makes them durable within the second can do better on that disk.

When the bound is below nbdkit's rate, the target "at least 1.0x nbdkit" is beyond this
disk for that job in that round. Runs as root (drop_caches).

Usage: bench-copy-bound.py THINBD [--rounds N] [--runtime S]
"""

import argparse
import heapq
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request

from bench_servers import stop, wait_for_socket

SIZE = 1 << 30
BLOCK = 64 << 10
RAMP = 2


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def start(command, sock):
    """Starts a server that listens on the Unix socket `sock` (see `wait_for_socket`)."""
    if os.path.exists(sock):
        os.unlink(sock)
    # Nothing reads the server's log here: a pipe nobody reads could fill and stall it.
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_socket(sock, proc)
    return proc


def drop_caches():
    run(["sync"])
    with open("/proc/sys/vm/drop_caches", "w") as caches:
        caches.write("3\n")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def disk_of(path):
    """The /proc/diskstats name of the block device holding `path`."""
    dev = os.stat(path).st_dev
    link = os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    return os.path.basename(link)


def disk_sample(name):
    """(bytes read, bytes written, ms busy) so far, from /proc/diskstats."""
    with open("/proc/diskstats") as stats:
        for line in stats:
            fields = line.split()
            if fields[2] == name:
                return int(fields[5]) * 512, int(fields[9]) * 512, int(fields[12])
    return 0, 0, 0


def copies_so_far(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith("thinbd_pool_copy_on_write_blocks_total"):
            return int(float(line.split()[-1]))
    return 0


def fio_randwrite(uri, runtime, sample=None):
    """fio's 4k randwrite QD32 as bench-nbd.py runs it; returns IOPS over the window and,
    with `sample`, its results every quarter second from fio's start to its end, each
    with the seconds since the start."""
    args = ["fio", "--name=bench", "--output-format=json", f"--runtime={runtime}", "--time_based",
            f"--ramp_time={RAMP}", f"--size={SIZE}", "--group_reporting", "--randrepeat=0", "--norandommap",
            "--rw=randwrite", "--bs=4k", "--iodepth=32", "--numjobs=1", "--ioengine=nbd", f"--uri={uri}"]
    samples = []
    finished = threading.Event()

    def sampler():
        started = time.time()

        def take():
            try:
                samples.append((time.time() - started, sample()))
            except OSError:
                pass  # the metrics listener not up yet, or gone: that quarter is skipped

        while True:
            take()
            if finished.wait(0.25):
                take()
                return

    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    thread = threading.Thread(target=sampler) if sample else None
    if thread:
        thread.start()
    output, _ = proc.communicate()
    finished.set()
    if thread:
        thread.join()
    if proc.returncode != 0:
        raise RuntimeError("fio failed")
    iops = json.loads(output[output.index("{"):])["jobs"][0]["write"]["iops"]
    return iops, samples


def disk_copy_rate(raw):
    """Copies a second the disk sustains: 16,384 random 64 KiB reads and as many writes
    of `raw` at QD32 (O_DIRECT), then fdatasync."""
    drop_caches()
    started = time.time()
    run(["fio", "--name=copy", "--ioengine=libaio", "--direct=1", f"--filename={raw}", "--rw=randrw",
         f"--bs={BLOCK}", "--iodepth=32", f"--io_size={2 * SIZE}", "--end_fsync=1", "--output-format=terse"])
    return (SIZE // BLOCK) / (time.time() - started)


def copy_phase(samples):
    """The clone's copy phase from the quarter-second samples: from the start until 99 %
    of the copies the job made were made (its tail of stragglers left out), with the
    copies made, their rate, and what the disk moved (MiB/s) and how busy it was then."""
    if len(samples) < 2:
        raise RuntimeError("the server's copy counter could not be read")
    total = samples[-1][1][0] - samples[0][1][0]
    end = next((i for i, (_, (copies, _)) in enumerate(samples) if copies - samples[0][1][0] >= 0.99 * total), len(samples) - 1)
    end = max(end, 1)
    (t0, (c0, d0)), (t1, (c1, d1)) = samples[0], samples[end]
    seconds = max(t1 - t0, 1e-3)
    return {"copies": c1 - c0, "seconds": seconds, "rate": (c1 - c0) / seconds,
            "read": (d1[0] - d0[0]) / seconds / (1 << 20), "written": (d1[1] - d0[1]) / seconds / (1 << 20),
            "busy": (d1[2] - d0[2]) / seconds / 10}


def ideal_bound(copy_rate, in_place_rate, runtime, depth=32, blocks=SIZE // BLOCK, seed=1):
    """IOPS over the window of a simulated server whose only costs are a FIFO disk doing
    `copy_rate` copies a second and a CPU doing `in_place_rate` other writes a second,
    under the job's client: `depth` writes in flight, each to a random block, the first
    write to a block waiting for its copy (as do later writes to it meanwhile)."""
    rng = random.Random(seed)
    copied_at = {}
    disk_free = cpu_free = 0.0
    events = []
    done = 0
    end = RAMP + runtime

    def issue(now):
        nonlocal disk_free, cpu_free
        block = rng.randrange(blocks)
        if block not in copied_at:
            disk_free = max(disk_free, now) + 1 / copy_rate
            copied_at[block] = disk_free
            heapq.heappush(events, disk_free)
        elif copied_at[block] > now:
            heapq.heappush(events, copied_at[block])
        else:
            cpu_free = max(cpu_free, now) + 1 / in_place_rate
            heapq.heappush(events, cpu_free)

    for _ in range(depth):
        issue(0.0)
    while events:
        now = heapq.heappop(events)
        if now > end:
            break
        if now >= RAMP:
            done += 1
        issue(now)
    return done / runtime


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("Usage:")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("thinbd")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--runtime", type=int, default=5, metavar="S", help="seconds after the 2 s ramp (default 5)")
    options = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("needs root (drop_caches)")
    thinbd = os.path.abspath(options.thinbd)
    work = tempfile.mkdtemp(prefix="thinbd-copybound-", dir=os.environ.get("TMPDIR", "/tmp"))
    disk = disk_of(work)
    servers = []
    try:
        raw = os.path.join(work, "raw.img")
        run(["fio", "--name=fill", "--rw=write", "--bs=1M", f"--size={SIZE}", "--ioengine=libaio", "--direct=1",
             "--iodepth=8", f"--filename={raw}", "--refill_buffers", "--output-format=terse"])
        pools = {}
        for kind in ("cow", "plain"):
            pool = os.path.join(work, f"{kind}.pool")
            run([thinbd, "create", pool, "--size", "16G"])
            run([thinbd, "volume", "create", pool, "base", "--size", str(SIZE)])
            sock = os.path.join(work, "fill.sock")
            proc = start([thinbd, "serve", pool, "--socket", sock, "--cache", "writeback"], sock)
            try:
                run(["nbdcopy", "--connections=1", raw, f"nbd+unix:///base?socket={sock}"])
            finally:
                stop(proc)
            if kind == "cow":
                run([thinbd, "snapshot", pool, "base@prefill"])
            pools[kind] = pool
        print(f"pool directory {work} on {disk}; {options.rounds} rounds, {options.runtime} s after a {RAMP} s ramp")
        header = ("| round | clone IOPS | ideal copier | nbdkit | in-place (plain) | disk copies/s (fio) | "
                  "clone's copy phase | disk in it: MiB/s read+write, busy | ideal/nbdkit | clone/nbdkit |")
        print(header)
        print("| --- " * (header.count("|") - 1) + "|")
        rows = []
        for round_number in range(1, options.rounds + 1):
            # The clone's job.
            name = f"job{round_number}"
            run([thinbd, "clone", pools["cow"], "base@prefill", name])
            sock = os.path.join(work, "thinbd.sock")
            port = free_port()
            drop_caches()
            proc = start([thinbd, "serve", pools["cow"], "--socket", sock, "--cache", "writeback",
                          "--metrics", str(port)], sock)
            servers.append(proc)
            try:
                clone, samples = fio_randwrite(f"nbd+unix:///{name}?socket={sock}", options.runtime,
                                               sample=lambda: (copies_so_far(port), disk_sample(disk)))
            finally:
                stop(proc)
                run([thinbd, "volume", "delete", pools["cow"], name])
            phase = copy_phase(samples)
            # The plain volume's job: the in-place rate.
            drop_caches()
            proc = start([thinbd, "serve", pools["plain"], "--socket", sock, "--cache", "writeback"], sock)
            try:
                plain, _ = fio_randwrite(f"nbd+unix:///base?socket={sock}", options.runtime)
            finally:
                stop(proc)
            # nbdkit's file plugin.
            ksock = os.path.join(work, "nbdkit.sock")
            drop_caches()
            proc = start(["nbdkit", "-f", "-U", ksock, "file", raw], ksock)
            try:
                nbdkit, _ = fio_randwrite(f"nbd+unix:///?socket={ksock}", options.runtime)
            finally:
                stop(proc)
            rate = disk_copy_rate(raw)
            bound = ideal_bound(rate, plain, options.runtime)
            rows.append((clone, bound, nbdkit, plain, rate, phase["rate"]))
            print(f"| {round_number} | {clone:,.0f} | {bound:,.0f} | {nbdkit:,.0f} | {plain:,.0f} | {rate:,.0f} | "
                  f"{phase['copies']:,} in {phase['seconds']:.1f} s: {phase['rate']:,.0f}/s | "
                  f"{phase['read']:,.0f}+{phase['written']:,.0f}, {phase['busy']:.0f} % | "
                  f"{bound / nbdkit:.2f}x | {clone / nbdkit:.2f}x |", flush=True)

        def median(values):
            ordered = sorted(values)
            return ordered[len(ordered) // 2] if len(ordered) % 2 else (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2

        clone, bound, nbdkit, plain, rate, copying = (median([row[i] for row in rows]) for i in range(6))
        print(f"medians: clone {clone:,.0f}, ideal copier {bound:,.0f}, nbdkit {nbdkit:,.0f}, in-place {plain:,.0f} IOPS; "
              f"disk {rate:,.0f} copies/s (fio), the clone's copy phase {copying:,.0f}/s; ideal/nbdkit {median([r[1] / r[2] for r in rows]):.2f}x, "
              f"clone/nbdkit {median([r[0] / r[2] for r in rows]):.2f}x, clone/ideal {median([r[0] / r[1] for r in rows]):.2f}x")
    finally:
        for proc in servers:
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
