"""The event loop never waits: reads stay in flight on every loop while clients open new
ephemeral exports and pool commands (snapshot, volume create and delete, info) run
through the control socket.

Usage: loop_never_waits.py SOCKET THINBD POOL ROUNDS [--drop-cache]
With --drop-cache (for a server with --cache writeback) the pool file's pages are
dropped from the page cache every 20 ms, so that reads keep missing it and go through
the loop's io_uring queue instead of being served from the cache on the spot.
The server runs with --ephemeral 'job-*=a'; volume a is fully written. Before the fix,
opening job-1 (whose clone commits, and whose commit drained reads that only the
blocked loop could complete) hung the whole server. Every step here has a deadline;
a step that misses it is reported with the step's name, and the script exits 1.
"""
import os
import random
import subprocess
import sys
import threading
import time

import nbd

socket_path, thinbd, pool, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
drop_cache = "--drop-cache" in sys.argv[5:]
STEP_DEADLINE = 30.0
failures = []
stop = threading.Event()


def uri(name):
    return f"nbd+unix:///{name}?socket={socket_path}"


# Readers: 4 connections (spread over the server's loops) doing 4 KiB random reads at
# queue depth 1, so that reads are in flight on every loop all the time.
reads = [0] * 4
latencies = [[] for _ in range(4)]


def reader(index):
    try:
        h = nbd.NBD()
        h.connect_uri(uri("a"))
        size = h.get_size()
        rng = random.Random(index)
        while not stop.is_set():
            offset = rng.randrange(0, size // 4096) * 4096
            started = time.monotonic()
            h.pread(4096, offset)
            latencies[index].append(time.monotonic() - started)
            reads[index] += 1
        h.shutdown()
    except Exception as error:
        failures.append(f"reader {index}: {error}")


def within_deadline(name, body):
    """Runs body on a thread; a step that does not finish in time is a hang."""
    outcome = {}

    def run():
        try:
            outcome["value"] = body()
        except Exception as error:
            outcome["error"] = error

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(STEP_DEADLINE)
    elapsed = time.monotonic() - started
    if thread.is_alive():
        print(f"HANG: {name} did not finish within {STEP_DEADLINE:.0f} s; reads so far {sum(reads)}", flush=True)
        # The server is stuck: nothing else can be checked. The fixture stops it.
        os._exit(1)
    if "error" in outcome:
        failures.append(f"{name}: {outcome['error']}")
    return elapsed


def open_job(name):
    h = nbd.NBD()
    h.connect_uri(uri(name))
    h.pwrite(b"\x5a" * 4096, 0)
    if h.pread(4096, 0) != b"\x5a" * 4096:
        raise RuntimeError(f"{name} did not read back its write")
    return h


def cli(*arguments):
    result = subprocess.run([thinbd, *arguments], capture_output=True, text=True, timeout=STEP_DEADLINE + 5)
    if result.returncode != 0:
        raise RuntimeError(f"thinbd {' '.join(arguments)}: {result.stderr.strip()}")
    return result.stdout


def dropper():
    fd = os.open(pool, os.O_RDONLY)
    try:
        while not stop.is_set():
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            time.sleep(0.02)
    finally:
        os.close(fd)


threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(4)]
if drop_cache:
    threads.append(threading.Thread(target=dropper, daemon=True))
for t in threads:
    t.start()
time.sleep(0.3)

open_times = []
handles = []
for i in range(rounds):
    box = {}

    def opener(i=i):
        box["h"] = open_job(f"job-{i}")

    open_times.append(within_deadline(f"opening job-{i}", opener))
    if "h" in box:
        handles.append(box["h"])
    within_deadline(f"snapshot a@s{i}", lambda i=i: cli("snapshot", pool, f"a@s{i}"))
    within_deadline(f"volume create v{i}", lambda i=i: cli("volume", "create", pool, f"v{i}", "--size", "16M"))
    within_deadline(f"volume delete v{i}", lambda i=i: cli("volume", "delete", pool, f"v{i}"))
    within_deadline("info", lambda: cli("info", pool))

# Forty new ephemeral names at once.
burst = []
burst_errors = []


def burst_open(name):
    try:
        burst.append(open_job(name))
    except Exception as error:
        burst_errors.append(f"{name}: {error}")


def open_burst():
    workers = [threading.Thread(target=burst_open, args=(f"job-burst-{k}",)) for k in range(40)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


within_deadline("40 ephemeral opens at once", open_burst)
failures.extend(burst_errors)
for h in handles + burst:
    h.shutdown()

stop.set()
for t in threads:
    t.join(STEP_DEADLINE)
total = sum(reads)
if total == 0:
    failures.append("the readers completed no read")
for index in range(4):
    if reads[index] == 0:
        failures.append(f"reader {index} completed no read")

every = sorted(x for series in latencies for x in series)
if every:
    print(f"reads {total}; read latency p50 {every[len(every) // 2] * 1000:.2f} ms, "
          f"max {every[-1] * 1000:.1f} ms; slowest open {max(open_times) * 1000:.1f} ms", flush=True)
for failure in failures:
    print("FAIL:", failure, flush=True)
sys.exit(1 if failures else 0)
