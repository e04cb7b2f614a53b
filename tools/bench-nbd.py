#!/usr/bin/python3
"""The data-path benchmark: the same fio jobs against thinbd and its peers, in one run.

Servers under test (all on Unix sockets in a private directory, each stopped by its pid
or by captive mode):
  thinbd --cache none       on a clone of a snapshotted, prefilled volume (writes copy-on-write)
  thinbd --cache none       on the prefilled volume itself (nothing shared: writes in place)
  thinbd --cache writeback  the same two
  qemu-nbd --cache=none --aio=native on qcow2 with an internal snapshot (reverted before each job)
  nbdkit file plugin on a raw file (page cache)
  fio libaio with O_DIRECT on the raw file (the physical limit)

With --tls, the TLS comparison instead: thinbd in plain text, thinbd with --tls require
(X.509, made by Tests/InteropTests/scripts/tlscerts.sh), qemu-nbd with --tls-creds on the
same qcow2, qemu-nbd in plain text, and nbdkit's null plugin over TLS (no I/O at all:
the ceiling the client's own TLS puts on any server), for 1M sequential read and write
and 4K random read. fio's nbd engine speaks TLS through libnbd, which finds the client's credentials
in $HOME/.pki/libnbd (a private HOME for fio).

Each job runs on every server before the next job starts, so that the numbers a ratio
compares were measured minutes apart at most; with --repeat N the whole sequence runs N
times and the table shows medians. Prints a table of IOPS and MiB/s per job and the ratios
thinbd/peer and thinbd/limit, then the server's peak memory with 16 exports in use.
With --cold, every job starts with a cold page cache: each server is started, then
`sync` and `echo 3 > /proc/sys/vm/drop_caches` (root), then fio. In the warm run (the
default) every job starts after `sync`, and each server that reads and writes through
the page cache (thinbd --cache writeback, nbdkit's file plugin) gets its file in the
same state first: dropped from the cache, then the export read once, sequentially,
through the server (nbdcopy to null:). Without that the two files carried different
histories, and on this kernel (6.18, ext4 with large folios) that alone moved 4K random
writes by 3-4x: pages cached by read-ahead or by large writes sit in large folios, and a
4K write dirties the whole folio (docs/performance.md). A job also ran while the page
cache wrote back what the previous server had dirtied, so the order of the columns
mattered.

The 4K random read at QD1 reports mean completion latency (microseconds) instead of
IOPS, and its ratio is thinbd's latency over the peer's (lower is better).
With --ceiling, nbdkit's memory plugin is measured too: no disk at all, the socket's
ceiling on this machine.
The four thinbd columns run `serve` with its default transmission loop (lean since
2026-12-06; nio in older binaries). With --nio (or --lean) they are measured again with
`serve --transmission nio` (or lean), in columns of their own ("thinbd nio wb, plain"),
with their own ratios and one against the default's column.

Usage: bench-nbd.py THINBD [--runtime S] [--repeat N] [--only COLUMN,...] [--jobs N,...] [--no-memory] [--tls] [--cold] [--ceiling] [--nio] [--lean]
"""
import argparse
import json
import resource
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from bench_servers import stop, wait_for_socket

SIZE = 1 << 30
RAMP = 2
# The transmission loops `serve --transmission` takes; --nio and --lean add columns for them.
TRANSMISSIONS = ("nio", "lean")

ALL_JOBS = [
    ("4k randread QD32", dict(rw="randread", bs="4k", iodepth=32, numjobs=1)),
    ("4k randwrite QD32", dict(rw="randwrite", bs="4k", iodepth=32, numjobs=1)),
    ("1M seqread QD8", dict(rw="read", bs="1M", iodepth=8, numjobs=1)),
    ("1M seqwrite QD8", dict(rw="write", bs="1M", iodepth=8, numjobs=1)),
    ("4k randrw 4 conns", dict(rw="randrw", bs="4k", iodepth=8, numjobs=4)),
    ("4k randread QD1 (latency)", dict(rw="randread", bs="4k", iodepth=1, numjobs=1)),
]


def parse_arguments():
    # The docstring's first paragraphs are the help text; an unknown or misspelt option is
    # an error, never a silent full-length run.
    parser = argparse.ArgumentParser(description=__doc__.split("Usage:")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("thinbd", help="the thinbd binary to measure")
    parser.add_argument("--runtime", type=int, default=10, metavar="S", help="seconds per job after a 2 s ramp (default 10)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N", help="run the whole sequence N times; tables show medians")
    parser.add_argument("--only", metavar="COLUMN,...", help='measure only these columns, named without commas ("thinbd wb plain")')
    parser.add_argument("--jobs", metavar="N,...", help="job indices to run: " + ", ".join(f"{i} {name}" for i, (name, _) in enumerate(ALL_JOBS)))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory of 16 exports")
    parser.add_argument("--tls", action="store_true", help="the TLS comparison instead of the data-path table")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every job for every server (root)")
    parser.add_argument("--ceiling", action="store_true", help="measure nbdkit's memory plugin too: the socket's ceiling")
    parser.add_argument("--nio", action="store_true", help="measure thinbd with --transmission nio too (its own columns)")
    parser.add_argument("--lean", action="store_true", help="measure thinbd with --transmission lean too (its own columns)")
    arguments = parser.parse_args()
    if arguments.runtime < 1 or arguments.repeat < 1:
        parser.error("--runtime and --repeat must be at least 1")
    if arguments.jobs is not None:
        indices = arguments.jobs.split(",")
        if not all(i.strip().isdigit() and int(i) < len(ALL_JOBS) for i in indices):
            parser.error(f"--jobs takes indices 0-{len(ALL_JOBS) - 1}: " + ", ".join(f"{i} {name}" for i, (name, _) in enumerate(ALL_JOBS)))
        arguments.jobs = [ALL_JOBS[int(i)] for i in indices]
    if not os.access(arguments.thinbd, os.X_OK):
        parser.error(f"{arguments.thinbd}: not an executable thinbd binary")
    return arguments


ARGUMENTS = parse_arguments()
THINBD = os.path.abspath(ARGUMENTS.thinbd)
RUNTIME = ARGUMENTS.runtime
REPEAT = ARGUMENTS.repeat
ONLY = ARGUMENTS.only.split(",") if ARGUMENTS.only else None
COLD = ARGUMENTS.cold
TLS = ARGUMENTS.tls
DEFAULT_JOBS = [ALL_JOBS[2], ALL_JOBS[3], ALL_JOBS[0]] if TLS else ALL_JOBS
JOBS = ARGUMENTS.jobs if ARGUMENTS.jobs is not None else DEFAULT_JOBS
WORK = tempfile.mkdtemp(prefix="thinbd-bench-", dir=os.environ.get("TMPDIR", "/tmp"))
# Credentials for --tls: server/ for the servers, and a HOME whose .pki/libnbd holds the
# client's, where libnbd (under fio) looks for them.
TLS_DIR = os.path.join(WORK, "tls")
FIO_HOME = os.path.join(WORK, "fio-home")


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def is_latency(params):
    return params["iodepth"] == 1


def process_cpu_seconds(pid):
    """User plus system time of a process and all its threads (io_uring's io-wq workers
    included: they are threads of the process), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_schedstats(pid):
    """Per thread of a process: (name, ns on a CPU, ns runnable but waiting for one),
    from /proc/PID/task/TID/schedstat. A thread whose two add up to about all of the
    elapsed time always wanted a CPU: it, not the disk or the client, set the pace."""
    threads = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return threads  # the server is gone
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as comm, open(f"/proc/{pid}/task/{tid}/schedstat") as stat:
                running, waiting = stat.read().split()[:2]
                threads[tid] = (comm.read().strip(), int(running), int(waiting))
        except (OSError, ValueError):
            pass  # the thread ended between listing and reading
    return threads


def busiest_thread(before, after, seconds):
    """The thread that was on a CPU longest between two `thread_schedstats` samples:
    (name, % of the time running, % runnable and waiting)."""
    best = None
    for tid, (name, running, waiting) in after.items():
        if tid not in before:
            continue
        ran = (running - before[tid][1]) / (seconds * 1e9) * 100
        waited = (waiting - before[tid][2]) / (seconds * 1e9) * 100
        if best is None or ran > best[1]:
            best = (name, ran, waited)
    return best


def fio(job, target, server_pid=None):
    """Runs one fio job; target is ('nbd', uri) or ('file', path). Returns (iops, MiB/s,
    cpu), or for a QD1 job (mean completion latency in microseconds, MiB/s, cpu). cpu is
    (server µs, client µs, busiest) of CPU time per request: the server's over the measured part
    of the run (after the ramp), from /proc (None without `server_pid`); fio's (all its
    job processes) over the whole run, ramp included, from getrusage, divided by the
    requests of the whole run at the measured rate; then the server's busiest thread over
    the measured part (`busiest_thread`), or None."""
    name, params = job
    args = ["fio", "--name=bench", "--output-format=json", f"--runtime={RUNTIME}", "--time_based",
            f"--ramp_time={RAMP}", f"--size={SIZE}", "--group_reporting", "--randrepeat=0", "--norandommap"]
    for key, value in params.items():
        args.append(f"--{key}={value}")
    if params["numjobs"] > 1:
        args.append(f"--offset_increment={SIZE // params['numjobs']}")
        args[args.index(f"--size={SIZE}")] = f"--size={SIZE // params['numjobs']}"
    if target[0] == "nbd":
        args += ["--ioengine=nbd", f"--uri={target[1]}"]
    else:
        args += ["--ioengine=libaio", "--direct=1", f"--filename={target[1]}"]
    env = None
    if target[0] == "nbd" and target[1].startswith("nbds"):
        env = dict(os.environ, HOME=FIO_HOME)
    # Nobody's job runs while the page cache writes back what an earlier one dirtied.
    run(["sync"])
    if COLD:
        with open("/proc/sys/vm/drop_caches", "w") as caches:
            caches.write("3\n")
    # The server's CPU time is sampled when the ramp ends and when fio has finished.
    server_cpu = []
    server_threads = []
    samplers = []
    if server_pid is not None:
        def sample_threads():
            server_threads.append((time.monotonic(), thread_schedstats(server_pid)))
        samplers = [threading.Timer(RAMP, lambda: server_cpu.append(process_cpu_seconds(server_pid))),
                    threading.Timer(RAMP, sample_threads),
                    # Threads are sampled again before fio ends: a server may end a
                    # connection's threads when it closes (nbdkit does).
                    threading.Timer(RAMP + RUNTIME * 0.9, sample_threads)]
        for sampler in samplers:
            sampler.start()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = run(args, env=env).stdout
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for sampler in samplers:
        sampler.join()
    if server_pid is not None:
        server_cpu.append(process_cpu_seconds(server_pid))
    data = json.loads(out[out.index("{"):])
    result = data["jobs"][0]
    iops = result["read"]["iops"] + result["write"]["iops"]
    mibs = (result["read"]["bw_bytes"] + result["write"]["bw_bytes"]) / (1 << 20)
    requests = max(1.0, iops * RUNTIME)
    client_seconds = (children_after.ru_utime + children_after.ru_stime) - (children_before.ru_utime + children_before.ru_stime)
    client_us = client_seconds / (requests * (RUNTIME + RAMP) / RUNTIME) * 1e6
    server_us = (server_cpu[1] - server_cpu[0]) / requests * 1e6 if len(server_cpu) == 2 else None
    busiest = None
    if len(server_threads) == 2:
        (t0, before), (t1, after) = server_threads
        busiest = busiest_thread(before, after, max(t1 - t0, 1e-3))
    cpu = (server_us, client_us, busiest)
    if is_latency(params):
        return result["read"]["clat_ns"]["mean"] / 1000, mibs, cpu
    return iops, mibs, cpu


def prefill_raw():
    raw = os.path.join(WORK, "raw.img")
    run(["fio", "--name=fill", "--rw=write", "--bs=1M", f"--size={SIZE}", "--ioengine=libaio", "--direct=1",
         "--iodepth=8", f"--filename={raw}", "--refill_buffers", "--output-format=terse"])
    return raw


def thinbd_server(pool, cache, export, tls=False, transmission=None):
    sock = os.path.join(WORK, f"thinbd-{export}.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    extra = ["--tls", "require", "--tls-certificates", os.path.join(TLS_DIR, "server")] if tls else []
    if transmission:
        extra += ["--transmission", transmission]
    proc = subprocess.Popen([THINBD, "serve", pool, "--socket", sock, "--cache", cache] + extra,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_socket(sock, proc)
    return proc, f"{'nbds' if tls else 'nbd'}+unix:///{export}?socket={sock}"


def make_tls_credentials():
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Tests", "InteropTests", "scripts", "tlscerts.sh")
    run(["/bin/sh", script, TLS_DIR])
    shutil.copytree(os.path.join(TLS_DIR, "client"), os.path.join(FIO_HOME, ".pki", "libnbd"))


class ThinbdColumn:
    """A pool prefilled once (one connection, as qemu-img convert fills the qcow2 peer),
    served by its own server process per job. With `plain`, every job runs on that
    volume itself: nothing is shared, writes overwrite in place. Otherwise it is
    snapshotted and each job runs on a new clone of the snapshot: every first write to a
    block copies it."""

    def __init__(self, raw, cache, plain=False, tls=False, transmission=None):
        self.cache, self.plain, self.tls, self.transmission = cache, plain, tls, transmission
        self.pool = os.path.join(WORK, f"thinbd-{cache}-{'plain' if plain else 'cow'}{'-tls' if tls else ''}"
                                 f"{'-' + transmission if transmission else ''}.pool")
        run([THINBD, "create", self.pool, "--size", "16G"])
        run([THINBD, "volume", "create", self.pool, "base", "--size", str(SIZE)])
        proc, uri = thinbd_server(self.pool, cache, "base")
        run(["nbdcopy", "--connections=1", raw, uri])
        stop(proc)
        if not plain:
            run([THINBD, "snapshot", self.pool, "base@prefill"])
        self.count = 0

    def run(self, job):
        self.count += 1
        name = "base" if self.plain else f"job{self.count}"
        if self.cache == "writeback":
            drop_from_page_cache(self.pool)
        if not self.plain:
            run([THINBD, "clone", self.pool, "base@prefill", name])
        proc = None
        try:
            # Started inside the try: a server that fails to start leaves no clone behind.
            proc, uri = thinbd_server(self.pool, self.cache, name, tls=self.tls, transmission=self.transmission)
            if self.cache == "writeback":
                read_once(uri)
            return fio(job, ("nbd", uri), server_pid=proc.pid)
        finally:
            if proc is not None:
                stop(proc)
            if not self.plain:
                run([THINBD, "volume", "delete", self.pool, name])


def drop_from_page_cache(path):
    """Warm runs, before a page-cache server starts: its file written back and dropped
    from the cache, so that `read_once` gives every such server the same history."""
    if COLD:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_once(uri):
    """Warm runs: the export read once, sequentially, through its server (nbdcopy to
    null:), as a client that reads a disk before it writes to it would. A no-op in cold
    runs, which drop everything instead."""
    if not COLD:
        # Over TLS, libnbd finds the client's credentials under fio's private HOME.
        env = dict(os.environ, HOME=FIO_HOME) if uri.startswith("nbds") else None
        run(["nbdcopy", uri, "null:"], env=env)


def served_fio(job, command, sock, tls=False, read_first=False):
    """Starts a peer server on `sock`, runs one fio job against it, stops it by its pid.
    With `read_first`, the export is read once before the job (`read_once`)."""
    if os.path.exists(sock):
        os.unlink(sock)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_socket(sock, proc)
    uri = f"{'nbds' if tls else 'nbd'}+unix:///?socket={sock}"
    try:
        if read_first:
            read_once(uri)
        return fio(job, ("nbd", uri), server_pid=proc.pid)
    finally:
        stop(proc)


class QemuColumn:
    def __init__(self, raw, tls=False):
        self.tls = tls
        self.image = os.path.join(WORK, f"image{'-tls' if tls else ''}.qcow2")
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, self.image])
        run(["qemu-img", "snapshot", "-c", "prefill", self.image])

    def run(self, job):
        # Re-applying the snapshot makes every cluster shared again: writes copy-on-write.
        run(["qemu-img", "snapshot", "-a", "prefill", self.image])
        sock = os.path.join(WORK, "qemu.sock")
        tls = []
        if self.tls:
            # As thinbd's column: the server's certificate, clients not asked for one.
            tls = ["--object", f"tls-creds-x509,id=tls0,dir={os.path.join(TLS_DIR, 'server')},endpoint=server,verify-peer=off",
                   "--tls-creds", "tls0"]
        return served_fio(job, ["qemu-nbd", "--cache=none", "--aio=native", "-f", "qcow2", "-t", "-e", "8",
                                "--socket", sock] + tls + [self.image], sock, tls=self.tls)


class NbdkitColumn:
    def __init__(self, raw):
        self.raw = raw

    def run(self, job):
        sock = os.path.join(WORK, "nbdkit.sock")
        drop_from_page_cache(self.raw)
        return served_fio(job, ["nbdkit", "-f", "-U", sock, "file", self.raw], sock, read_first=True)


class MemoryColumn:
    """nbdkit's memory plugin: a server whose every request is a memcpy (or, for blocks
    never written, a memset), so the socket, the client and the kernel's Unix-socket path
    bound what any NBD server can reach on this machine. Not in the default set; name it
    with --only or add it with --ceiling."""

    def run(self, job):
        sock = os.path.join(WORK, "memory.sock")
        return served_fio(job, ["nbdkit", "-f", "-U", sock, "memory", str(SIZE)], sock)


class NullColumn:
    """nbdkit's null plugin over TLS: a server that does no I/O at all, so the client's
    own TLS cost bounds what any server can reach through it on this machine."""

    def run(self, job):
        sock = os.path.join(WORK, "null.sock")
        return served_fio(job, ["nbdkit", "-f", "-U", sock, "--tls=require",
                                f"--tls-certificates={os.path.join(TLS_DIR, 'server')}", "null", str(SIZE)],
                          sock, tls=True)


class RawColumn:
    def __init__(self, raw):
        self.raw = raw

    def run(self, job):
        return fio(job, ("file", self.raw))


def peak_memory_16_exports(transmission=None):
    pool = os.path.join(WORK, f"memory{'-' + transmission if transmission else ''}.pool")
    run([THINBD, "create", pool, "--size", "32G"])
    for i in range(16):
        run([THINBD, "volume", "create", pool, f"v{i}", "--size", "1G"])
    sock = os.path.join(WORK, "memory.sock")
    extra = ["--transmission", transmission] if transmission else []
    proc = subprocess.Popen([THINBD, "serve", pool, "--socket", sock] + extra, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    wait_for_socket(sock, proc)
    try:
        workers = [threading.Thread(target=fio, args=(("mixed", dict(rw="randrw", bs="64k", iodepth=8, numjobs=1)),
                                                      ("nbd", f"nbd+unix:///v{i}?socket={sock}")))
                   for i in range(16)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        with open(f"/proc/{proc.pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status)
        return int(fields["VmHWM"].split()[0]) * 1024
    finally:
        stop(proc)
        os.unlink(pool)


def measure(servers):
    """Runs every job on every server, job by job, REPEAT times; the median (IOPS, MiB/s)
    per server and job (by IOPS; MiB/s follows the same sample)."""
    samples = {title: [[] for _ in JOBS] for title, _ in servers}
    for round in range(REPEAT):
        for i, job in enumerate(JOBS):
            print(f"round {round + 1}/{REPEAT}: {job[0]} ...", flush=True)
            for title, server in servers:
                samples[title][i].append(server.run(job))
    return {title: [sorted(runs, key=lambda r: r[0])[len(runs) // 2] for runs in per_job]
            for title, per_job in samples.items()}


def main():
    started = time.time()
    print(f"working set {SIZE >> 20} MiB, {RUNTIME} s per job, directory {WORK}", flush=True)
    if TLS:
        return tls_comparison(prefill_raw(), started)
    columns = [
        ("thinbd none, CoW", lambda: ThinbdColumn(raw, "none")),
        ("thinbd none, plain", lambda: ThinbdColumn(raw, "none", plain=True)),
        ("thinbd wb, CoW", lambda: ThinbdColumn(raw, "writeback")),
        ("thinbd wb, plain", lambda: ThinbdColumn(raw, "writeback", plain=True)),
        ("qemu-nbd qcow2", lambda: QemuColumn(raw)),
        ("nbdkit file", lambda: NbdkitColumn(raw)),
        ("raw libaio", lambda: RawColumn(raw)),
    ]
    def loop_columns(loop):
        return [
            (f"thinbd {loop} none, CoW", lambda: ThinbdColumn(raw, "none", transmission=loop)),
            (f"thinbd {loop} none, plain", lambda: ThinbdColumn(raw, "none", plain=True, transmission=loop)),
            (f"thinbd {loop} wb, CoW", lambda: ThinbdColumn(raw, "writeback", transmission=loop)),
            (f"thinbd {loop} wb, plain", lambda: ThinbdColumn(raw, "writeback", plain=True, transmission=loop)),
        ]
    chosen = [loop for loop in TRANSMISSIONS if getattr(ARGUMENTS, loop)]
    for loop in reversed(chosen):
        columns[4:4] = loop_columns(loop)
    ceiling = ("nbdkit memory (socket ceiling)", lambda: MemoryColumn())
    all_columns = columns + [c for loop in TRANSMISSIONS if loop not in chosen for c in loop_columns(loop)] + [ceiling]
    if ARGUMENTS.ceiling or ONLY:
        columns.append(ceiling)
    if ONLY:
        # Column titles hold commas; a selector names a title without them ("thinbd none CoW").
        columns = [c for c in all_columns if any(c[0].replace(",", "").startswith(o.strip()) for o in ONLY)]
        if not columns:
            sys.exit(f"--only {','.join(ONLY)} names no column; the columns are: "
                     + "; ".join(title.replace(",", "") for title, _ in all_columns))
    raw = prefill_raw()
    print("preparing " + ", ".join(title for title, _ in columns) + " ...", flush=True)
    results = measure([(title, make()) for title, make in columns])
    memory = None if ARGUMENTS.no_memory else peak_memory_16_exports()
    loop_memory = {} if ARGUMENTS.no_memory else {loop: peak_memory_16_exports(loop) for loop in chosen}

    print()
    print(f"page cache: {'cold (dropped before every job)' if COLD else 'warm (page-cache servers: file dropped, then the export read once, before every job)'}")
    ratios = [("none CoW/qemu-nbd", "thinbd none, CoW", "qemu-nbd qcow2"), ("none plain/qemu-nbd", "thinbd none, plain", "qemu-nbd qcow2"),
              ("wb CoW/nbdkit", "thinbd wb, CoW", "nbdkit file"), ("wb plain/nbdkit", "thinbd wb, plain", "nbdkit file"),
              ("wb CoW/none CoW", "thinbd wb, CoW", "thinbd none, CoW"), ("none CoW/raw", "thinbd none, CoW", "raw libaio"),
              ("none plain/raw", "thinbd none, plain", "raw libaio"),
              ("none plain/ceiling", "thinbd none, plain", "nbdkit memory (socket ceiling)"),
              ("wb plain/ceiling", "thinbd wb, plain", "nbdkit memory (socket ceiling)")]
    for loop in TRANSMISSIONS:
        ratios += [(f"{loop} none CoW/qemu-nbd", f"thinbd {loop} none, CoW", "qemu-nbd qcow2"),
                   (f"{loop} none plain/qemu-nbd", f"thinbd {loop} none, plain", "qemu-nbd qcow2"),
                   (f"{loop} wb CoW/nbdkit", f"thinbd {loop} wb, CoW", "nbdkit file"),
                   (f"{loop} wb plain/nbdkit", f"thinbd {loop} wb, plain", "nbdkit file"),
                   (f"{loop} none CoW/raw", f"thinbd {loop} none, CoW", "raw libaio"),
                   (f"{loop} none plain/raw", f"thinbd {loop} none, plain", "raw libaio"),
                   (f"{loop}/default none plain", f"thinbd {loop} none, plain", "thinbd none, plain"),
                   (f"{loop}/default wb plain", f"thinbd {loop} wb, plain", "thinbd wb, plain")]
    ratios = [r for r in ratios if r[1] in results and r[2] in results]
    print("| job | " + " | ".join(title for title, _ in columns) + " | " + " | ".join(r[0] for r in ratios) + " |")
    print("| --- " * (len(columns) + len(ratios) + 1) + "|")
    for i, (name, params) in enumerate(JOBS):
        large = params["bs"] == "1M"
        latency = is_latency(params)
        cells = []
        for title, _ in columns:
            value, mibs, _ = results[title][i]
            cells.append(f"{mibs:,.0f} MiB/s" if large else f"{value:,.1f} µs" if latency else f"{value:,.0f} IOPS")
        def ratio(a, b):
            if a not in results or b not in results:
                return "-"
            x = results[a][i][1 if large else 0]
            y = results[b][i][1 if large else 0]
            return f"{x / y:.2f}x" if y else "-"
        print(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(ratio(a, b) for _, a, b in ratios) + " |")
    print("(QD1 rows: latency, so their ratios are better below 1.0)")
    print()
    print("CPU time per request, µs: server + client (fio); the raw column's is fio's alone")
    print("| job | " + " | ".join(title for title, _ in columns) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    for i, (name, _) in enumerate(JOBS):
        cells = []
        for title, _ in columns:
            server_us, client_us, _ = results[title][i][2]
            cells.append(f"{client_us:.1f}" if server_us is None else f"{server_us:.1f} + {client_us:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    servers = [title for title, _ in columns if any(results[title][i][2][2] for i in range(len(JOBS)))]
    print("The server's busiest thread over the measured part: % of the time on a CPU + % runnable and")
    print("waiting for one (about 100 together: that thread set the pace)")
    print("| job | " + " | ".join(servers) + " |")
    print("| --- " * (len(servers) + 1) + "|")
    for i, (name, _) in enumerate(JOBS):
        cells = []
        for title in servers:
            busiest = results[title][i][2][2]
            cells.append("-" if busiest is None else f"{busiest[0]} {busiest[1]:.0f} + {busiest[2]:.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    if memory is not None:
        print(f"thinbd peak memory (VmHWM) serving 16 exports with 16 clients: {memory / (1 << 20):.1f} MiB")
    for loop, peak in loop_memory.items():
        print(f"thinbd peak memory (VmHWM) serving 16 exports with 16 clients, --transmission {loop}: {peak / (1 << 20):.1f} MiB")
    if REPEAT > 1:
        print(f"medians of {REPEAT} rounds")
    print(f"total time {time.time() - started:.0f} s")
    shutil.rmtree(WORK, ignore_errors=True)


def tls_comparison(raw, started):
    make_tls_credentials()
    columns = [
        # Plain text on swift-nio as TLS is, so that the ratio is the cost of TLS alone
        # (and compares with the runs recorded before lean became serve's default).
        ("thinbd", ThinbdColumn(raw, "none", transmission="nio")),
        ("thinbd TLS", ThinbdColumn(raw, "none", tls=True)),
        ("qemu-nbd", QemuColumn(raw)),
        ("qemu-nbd TLS", QemuColumn(raw, tls=True)),
        ("nbdkit null TLS (ceiling)", NullColumn()),
    ]
    results = measure(columns)
    print()
    print("| job (--cache none, CoW clone; qcow2 for qemu-nbd) | " + " | ".join(t for t, _ in columns) +
          " | thinbd TLS / plain | thinbd TLS / qemu-nbd TLS | thinbd TLS / ceiling |")
    print("| --- " * (len(columns) + 4) + "|")
    for i, (name, params) in enumerate(JOBS):
        large = params["bs"] == "1M"
        value = lambda title: results[title][i][1 if large else 0]
        cells = [f"{value(t):,.0f} MiB/s" if large else f"{value(t):,.0f} IOPS" for t, _ in columns]
        ours = value("thinbd TLS")
        print(f"| {name} | " + " | ".join(cells) +
              f" | {ours / value('thinbd'):.2f}x | {ours / value('qemu-nbd TLS'):.2f}x |"
              f" {ours / value('nbdkit null TLS (ceiling)'):.2f}x |")
    print()
    if REPEAT > 1:
        print(f"medians of {REPEAT} rounds")
    print(f"total time {time.time() - started:.0f} s")


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
