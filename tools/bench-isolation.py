"""Isolation benchmark: one tenant's latency while the others do their worst.

Usage: bench-isolation.py THINBD [--dir DIR] [--phase-seconds S] [--keep] [--nice N] [--transmission nio|lean]

A reader process does 4 KiB random reads at queue depth 1 on export A (fully written)
the whole time, logging each read's start and latency. Phases run one after another;
each phase's window of the reader's log gives its p50, p99 and max:

  baseline                   nothing else
  zero 2 GiB NO_HOLE on B    one WRITE_ZEROES of 2 GiB with NBD_CMD_FLAG_NO_HOLE
  40 ephemeral clones        40 new names opened at once (--ephemeral 'job-*=A')
  control                    the same 40-connection rounds against nbdkit, not thinbd
  live check                 thinbd check while served
  20 live snapshots          thinbd snapshot, one after another
  128 connections            fio: 128 connections of 4 KiB random I/O on 16 other exports
  limited export             an export limited to 1,000 IOPS, hammered by 8 connections

Targets: every phase but the 128-connection one keeps the reader's p99 within 2x its
baseline and its max under 50 ms; 128 connections do within 10% of the IOPS of the
same load (same total queue depth) on 16 connections.

Controls, against nbdkit's memory plugin: the clone phase's connection rounds sent to
nbdkit while the reader reads from thinbd, and both fio loads run on nbdkit, with the
CPU time per request of each server and of fio (what the clients cost on shared cores).

The load generators (this driver, its threads and fio) run at nice 10 by default
(--nice 0 to turn it off), so that on a 2-core machine their own CPU use is not
measured as the server's interference; the server and the reader run at normal priority.

The server listens on a Unix socket in a private directory and is stopped by its pid.
"""
import argparse
import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import nbd

parser = argparse.ArgumentParser()
parser.add_argument("thinbd")
parser.add_argument("--dir", default=None, help="where the pool goes (default: a new directory under /tmp)")
parser.add_argument("--phase-seconds", type=float, default=5.0)
parser.add_argument("--keep", action="store_true", help="keep the pool directory")
parser.add_argument("--nice", type=int, default=10, help="niceness of the load generators (0: same as the reader)")
parser.add_argument("--transmission", choices=["nio", "lean"], help="the server's transmission loop (serve --transmission; default: serve's own)")
args = parser.parse_args()

thinbd = os.path.abspath(args.thinbd)
work = args.dir or tempfile.mkdtemp(prefix="thinbd-isolation-")
os.makedirs(work, exist_ok=True)
pool = os.path.join(work, "pool")
sock = os.path.join(work, "nbd.sock")
reader_log = os.path.join(work, "reader.log")
seconds = args.phase_seconds


def run(*command, **kwargs):
    return subprocess.run([str(c) for c in command], check=True, capture_output=True, text=True, **kwargs)


def uri(name):
    return f"nbd+unix:///{name}?socket={sock}"


def say(text):
    print(text, file=sys.stderr, flush=True)


# Pool: A (256 MiB, written), B (2 GiB, empty), 16 load exports of 64 MiB (written),
# one limited export.
for leftover in (pool, pool + ".control"):
    if os.path.exists(leftover):
        os.remove(leftover)
run(thinbd, "create", pool, "--size", "8G", "--metadata-size", "256M")
image = os.path.join(work, "a.raw")
with open(image, "wb") as f:
    f.write(os.urandom(256 << 20))
run(thinbd, "import", pool, "A", image)
os.remove(image)
run(thinbd, "volume", "create", pool, "B", "--size", "2G")
small = os.path.join(work, "small.raw")
with open(small, "wb") as f:
    f.write(os.urandom(64 << 20))
for i in range(16):
    run(thinbd, "import", pool, f"load-{i}", small)
run(thinbd, "import", pool, "limited", small)
os.remove(small)

server = subprocess.Popen(
    [thinbd, "serve", pool, "--socket", sock, "--ephemeral", "job-*=A", "--ephemeral-grace", "1", "--json"]
    + (["--transmission", args.transmission] if args.transmission else []),
    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
announced = json.loads(server.stdout.readline())
say(f"server pid {announced['pid']} on {sock}")

READER = r"""
import nbd, random, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
rng = random.Random(1)
out = open(sys.argv[2], "w", buffering=1 << 16)
blocks = size // 4096
while True:
    offset = rng.randrange(blocks) * 4096
    started = time.monotonic()
    h.pread(4096, offset)
    out.write(f"{started:.6f} {(time.monotonic() - started) * 1e6:.0f}\n")
"""
reader = subprocess.Popen([sys.executable, "-c", READER, uri("A"), reader_log])
time.sleep(2)  # warm-up: connection, metadata cache
if args.nice:
    # The load generators (this process, its threads and its fio children) yield the CPU
    # to the server and the reader: on two cores shared by all of them, their own CPU
    # use would otherwise be measured as the server's interference.
    os.nice(args.nice)

phases = []


def phase(name, body):
    """Runs one phase; body returns (windows, detail), detail, or nothing (then the
    whole phase is one window)."""
    started = time.monotonic()
    outcome = body()
    ended = time.monotonic()
    windows, detail = outcome if isinstance(outcome, tuple) else ([(started, ended)], outcome or "")
    phases.append((name, windows, detail))
    say(f"{name}: {ended - started:.2f} s {detail}")
    time.sleep(0.5)


def baseline():
    time.sleep(seconds)


def repeatedly(body):
    """Runs body once at a time, with a pause after each, until the phase time is up
    (at least once). Returns how many times it ran and the windows to sample: each run
    and the 100 ms after it (a commit it caused may come then). The pauses keep the
    phase about one operation, not a storm of them; sampling only the windows keeps
    the pauses from diluting the percentiles."""
    deadline = time.monotonic() + seconds
    windows = []
    while not windows or time.monotonic() < deadline:
        started = time.monotonic()
        body(len(windows))
        windows.append((started, time.monotonic() + 0.1))
        time.sleep(0.25)
    return windows


def zero_b():
    h = nbd.NBD()
    h.connect_uri(uri("B"))

    def once(_):
        h.zero(2 << 30, 0, nbd.CMD_FLAG_NO_HOLE)
        h.trim(2 << 30, 0)  # gives the space back for the next round

    windows = repeatedly(once)
    h.shutdown()
    return windows, f"({len(windows)} x 2 GiB, then trimmed)"


def control(request):
    """One request on the control socket (docs/control-api.md), as a program would send
    it: the phases measure the server, not the start-up of 20 CLI processes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(pool + ".control")
        s.sendall((json.dumps(request) + "\n").encode())
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    answer = json.loads(reply)
    if not answer.get("ok"):
        raise RuntimeError(f"{request}: {answer}")
    return answer["result"]


@contextlib.contextmanager
def nbdkit_memory():
    """A peer server for control measurements: nbdkit's memory plugin (one 64 MiB disk
    for every export name) on its own Unix socket; yields (socket path, pid)."""
    directory = tempfile.mkdtemp(prefix="nbdkit-", dir=work)
    peer_socket = os.path.join(directory, "nbd.sock")
    peer = subprocess.Popen(["nbdkit", "-f", "-U", peer_socket, "memory", "size=64M"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(peer_socket) and time.monotonic() < deadline:
            time.sleep(0.05)
        yield peer_socket, peer.pid
    finally:
        peer.terminate()
        peer.wait()


def connection_rounds(target_uri, label):
    """Rounds of forty connections from threads of one process (libnbd releases the GIL
    while it waits), each opening its own name at once, writing 4 KiB and leaving."""
    failures = []

    def open_job(name):
        try:
            h = nbd.NBD()
            h.connect_uri(target_uri(name))
            h.pwrite(b"x" * 4096, 0)
            h.shutdown()
        except Exception as error:
            failures.append(error)

    def round_(r):
        workers = [threading.Thread(target=open_job, args=(f"job-{r}-{i}",)) for i in range(40)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    windows = repeatedly(round_)
    return windows, f"({len(windows)} x 40 {label}{', %d failed: %s' % (len(failures), failures[0]) if failures else ''})"


def clones():
    return connection_rounds(uri, "clones")


def peer_connections():
    """Control for the clone phase: the same forty-connection rounds, but against
    another server (nbdkit's memory plugin), so nothing of them runs in thinbd. What
    the reader loses then is the cost of the clients and the kernel on shared cores."""
    with nbdkit_memory() as (peer_socket, _):
        return connection_rounds(lambda name: f"nbd+unix:///{name}?socket={peer_socket}", "connections to nbdkit")


def live_check():
    reports = []
    windows = repeatedly(lambda _: reports.append(control({"command": "check"})))
    clean = all(r.get("clean") for r in reports)
    return windows, f"({len(windows)} checks, {'all clean' if clean else 'DAMAGE FOUND'})"


def snapshots():
    def round_(r):
        for i in range(20):
            control({"command": "snapshot", "name": f"A@bench-{r}-{i}"})
        for i in range(20):
            control({"command": "delete", "name": f"A@bench-{r}-{i}"})

    windows = repeatedly(round_)
    return windows, f"({len(windows)} x 20 snapshots, each round deleted after)"


def cpu_seconds(pid):
    """User plus system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fio_load(connections_per_export, iodepth, runtime, socket_path=None, server_pid=None):
    """Random 4 KiB reads and writes on the 16 load exports; returns IOPS and the CPU
    microseconds per request of the server and of fio (its own, from its rusage)."""
    jobs = ["[global]", "ioengine=nbd", "thread=1", "rw=randrw", "bs=4k", "time_based", f"runtime={runtime}",
            f"iodepth={iodepth}", f"numjobs={connections_per_export}", "group_reporting=1", "size=64m"]
    for i in range(16):
        target = uri(f"load-{i}") if socket_path is None else f"nbd+unix:///load-{i}?socket={socket_path}"
        jobs += [f"[load-{i}]", f"uri={target}"]
    job_file = os.path.join(work, "load.fio")
    with open(job_file, "w") as f:
        f.write("\n".join(jobs) + "\n")
    server_pid = server_pid or announced["pid"]
    server_before = cpu_seconds(server_pid)
    data, fio_cpu = fio_json(job_file)
    iops = sum(job["read"]["iops"] + job["write"]["iops"] for job in data["jobs"])
    requests = max(1.0, iops * runtime)
    return {"iops": iops, "server_us": (cpu_seconds(server_pid) - server_before) / requests * 1e6,
            "fio_us": fio_cpu / requests * 1e6}


load_iops = {}


def fio_json(job_file):
    """Runs fio; returns its JSON document and the CPU seconds it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # fio's nbd engine prints "connected" lines before the JSON document.
    out = subprocess.run(["fio", "--output-format=json", job_file], check=True, capture_output=True, text=True, cwd=work).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return json.loads(out[out.index("{"):]), used


def peer_connection_scaling(runtime):
    """The same two loads on nbdkit's memory plugin (one 64 MiB disk for every export
    name): a peer's ratio on this machine, in this run, for the connection-count target."""
    with nbdkit_memory() as (peer_socket, pid):
        return fio_load(1, 8, runtime, peer_socket, pid), fio_load(8, 1, runtime, peer_socket, pid)


def many_connections():
    load_iops[128] = fio_load(8, 1, int(seconds * 2))
    return f"({load_iops[128]['iops']:.0f} IOPS)"


def limited_export():
    control({"command": "limit", "pattern": "limited", "iops": 1000, "bytes_per_second": 0})
    jobs = ["[global]", "ioengine=nbd", "thread=1", "rw=randread", "bs=4k", "time_based", f"runtime={int(seconds)}",
            "iodepth=4", "numjobs=8", "group_reporting=1", "size=64m", "[limited]", f"uri={uri('limited')}"]
    job_file = os.path.join(work, "limited.fio")
    with open(job_file, "w") as f:
        f.write("\n".join(jobs) + "\n")
    data, _ = fio_json(job_file)
    iops = sum(job["read"]["iops"] for job in data["jobs"])
    load_iops["limited"] = iops
    return f"(limited export did {iops:.0f} IOPS against its limit of 1000)"


try:
    phase("baseline", baseline)
    phase("one 2 GiB WRITE_ZEROES NO_HOLE on B", zero_b)
    phase("40 new ephemeral clones at once", clones)
    phase("control: the same 40 connections at once to nbdkit", peer_connections)
    phase("live check", live_check)
    phase("20 live snapshots", snapshots)
    phase("128 connections on 16 other exports", many_connections)
    phase("one export limited to 1,000 IOPS, hammered", limited_export)
    # Not a reader phase: the same load as 16 connections, for the IOPS comparison.
    load_iops[16] = fio_load(1, 8, int(seconds * 2))
    load_iops["peer"] = peer_connection_scaling(int(seconds * 2))
finally:
    reader.terminate()
    reader.wait()
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)

samples = []
with open(reader_log) as f:
    for line in f:
        parts = line.split()
        if len(parts) == 2:
            samples.append((float(parts[0]), int(parts[1])))


def stats(windows):
    window = sorted(latency for at, latency in samples if any(start <= at < end for start, end in windows))
    if not window:
        return None
    return window[len(window) // 2], window[min(len(window) - 1, int(len(window) * 0.99))], window[-1], len(window)


base = stats(phases[0][1])
print("| phase | reads | p50 (ms) | p99 (ms) | max (ms) | p99 / baseline | target |")
print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
all_met = True
for name, windows, detail in phases:
    s = stats(windows)
    if s is None:
        print(f"| {name} | 0 | | | | | no reads in the window |")
        all_met = False
        continue
    p50, p99, worst, count = s
    ratio = p99 / base[1]
    if name.startswith("128"):
        many, few = load_iops[128], load_iops[16]
        met = many["iops"] >= 0.9 * few["iops"]
        target = f"IOPS {many['iops']:.0f} vs {few['iops']:.0f} on 16 connections ({many['iops'] / few['iops']:.2f}x): {'met' if met else 'MISSED'}"
    elif name == "baseline" or name.startswith("control"):
        met, target = True, "- (not a thinbd phase)" if name.startswith("control") else "-"
    else:
        met = ratio <= 2 and worst < 50_000
        target = "met" if met else "MISSED"
    all_met = all_met and met
    print(f"| {name} {detail} | {count} | {p50 / 1000:.2f} | {p99 / 1000:.2f} | {worst / 1000:.1f} | {ratio:.2f} | {target} |")
print("\nConnection count, same total queue depth (CPU is microseconds per request):\n")
print("| server | 16 conns x depth 8 IOPS | 128 conns x depth 1 IOPS | ratio | server CPU 16 / 128 | fio CPU 16 / 128 |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for label, (few, many) in (("thinbd", (load_iops[16], load_iops[128])), ("nbdkit memory", load_iops["peer"])):
    print(f"| {label} | {few['iops']:.0f} | {many['iops']:.0f} | {many['iops'] / few['iops']:.2f} | "
          f"{few['server_us']:.1f} / {many['server_us']:.1f} | {few['fio_us']:.1f} / {many['fio_us']:.1f} |")
print(f"\nall targets met: {'yes' if all_met else 'no'}")
if not args.keep and not args.dir:
    subprocess.run(["rm", "-rf", work])
sys.exit(0 if all_met else 1)
