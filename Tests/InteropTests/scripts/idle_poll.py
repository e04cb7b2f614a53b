#!/usr/bin/python3
# An event loop's poll before it sleeps (serve --idle-poll), seen from a real client at
# queue depth 1.
#
# 1. Back-to-back reads, writes and flushes: each must be answered long before the poll
#    window ends. A poll that held a request (or an off-loop write's completion) until
#    its window ran out would make each take at least WINDOW_US.
# 2. Reads with pauses of a 25th of the window: the poll must catch the next request,
#    so the event loops hardly ever go to sleep (voluntary context switches,
#    /proc/PID/task/*/status; a loop that sleeps at once sleeps once per request). The
#    reads are of never-written blocks, answered on the loop without disk I/O, so that
#    no other wait puts the loop to sleep. Counted in switches, not CPU time: other
#    work on a busy machine takes CPU from the poll (it yields), not the wake-ups.
# 2b. The same with reads of blocks written in step 1, after the pool file's pages are
#    dropped from the page cache (POOL given): each read now waits for the disk through
#    the loop's disk queue, and the loop polls through that wait too.
# 3. Reads with pauses of twice the window: no poll can catch those, so polling must
#    stop after a few, and the server's CPU time grows by a few windows at most.
# 4. (CACHE writeback) Back-to-back 1 MiB reads of data the page cache holds: the disk
#    queue's page-cache thread copies each, and the loop must sleep meanwhile, not poll
#    (a poll would take the CPU the copy needs). Builds whose loops polled through the
#    copies (the lean loop's rule taken out, or the swift-nio loop's) slept 0-1 times in
#    100 reads, in each of six runs; with the rule the loops slept 16-100 times: fewer
#    than once per read when the thread runs on the loop's CPU, so that the loop waits
#    preempted, not asleep.
# Prints one JSON object; exits non-zero when a check fails.
# Usage: idle_poll.py URI SERVER_PID WINDOW_US [POOL [CACHE]]
import json
import os
import random
import sys
import time
import nbd

uri, pid, window_us = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pool = sys.argv[4] if len(sys.argv) > 4 else None
cache = sys.argv[5] if len(sys.argv) > 5 else None
window = window_us / 1e6
ticks = os.sysconf("SC_CLK_TCK")


def loop_sleeps():
    # The event loop threads' (swift-nio names its loops NIO-ELT-..., the lean loops are
    # thinbd-lean-N; requests are served on the lean ones unless --transmission nio):
    # the server's other threads wake on timers of their own, more often the longer a
    # busy machine makes the run.
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/comm") as f:
                if not f.read().startswith(("NIO-ELT", "thinbd-lean")):
                    continue
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass  # a thread that ended meanwhile
    return total


def server_cpu():
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / ticks


h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
# Phase 1 writes the first half; phases 2 and 3 read the second, never written.
half = size // 4096 // 2
rng = random.Random(7)
data = os.urandom(4096)
report = {}
failures = []


def timed(label, count, op):
    worst = 0.0
    total = 0.0
    for _ in range(count):
        start = time.monotonic()
        op()
        took = time.monotonic() - start
        worst = max(worst, took)
        total += took
    report[label] = {"mean_us": round(total / count * 1e6, 1), "worst_us": round(worst * 1e6, 1)}
    # A quarter of the window: far above a real request here (tens of microseconds; a
    # few milliseconds for flushes with CPU hogs running), below what a poll holding
    # each request costs (a build that did took 57-77 % of the window on average: the
    # window shrinks as the requests come late).
    if total / count >= window / 4:
        failures.append(f"{label}: mean {total / count * 1e6:.0f} us against a {window_us} us window")


timed("reads", 300, lambda: h.pread(4096, rng.randrange(half) * 4096))
written = [rng.randrange(half) * 4096 for _ in range(300)]
writes = iter(written)
timed("writes", 300, lambda: h.pwrite(data, next(writes)))
timed("flushes", 20, lambda: h.flush())


def paused_reads(count, pause, offsets=None):
    cpu, sleeps = server_cpu(), loop_sleeps()
    for i in range(count):
        h.pread(4096, offsets[i % len(offsets)] if offsets else (half + rng.randrange(half)) * 4096)
        time.sleep(pause)
    return server_cpu() - cpu, loop_sleeps() - sleeps


# The window is wide (the test gives 50 ms) so that a busy machine, which stretches a
# pause and the client's turnaround (to over 10 ms with three CPU hogs on two cores),
# does not stretch them past it.
_, short_sleeps = paused_reads(100, window / 25)
report["short_pauses_sleeps"] = short_sleeps
# A loop that sleeps at once sleeps at least once per pause (100); the poll catches
# nearly every request (a pause the machine stretches past the window may not be).
if short_sleeps >= 25:
    failures.append(f"short pauses: the event loops slept {short_sleeps} times in 100 pauses; the poll should have caught the requests")

if pool:
    h.flush()
    fd = os.open(pool, os.O_RDONLY)
    os.fdatasync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    _, disk_sleeps = paused_reads(100, window / 25, offsets=written[:100])
    report["disk_reads_sleeps"] = disk_sleeps
    if disk_sleeps >= 25:
        failures.append(f"reads from the disk: the event loops slept {disk_sleeps} times in 100 reads; the poll should have waited for the disk")

long_pauses, _ = paused_reads(20, window * 2)
report["long_pauses_cpu_s"] = round(long_pauses, 3)
# Halving from the full window costs about two windows in all; polling every pause
# would cost 20.
if long_pauses > 5 * window:
    failures.append(f"long pauses: the server used {long_pauses:.3f} s of CPU; polling should have stopped after a few windows")

if cache == "writeback":
    # Eight 1 MiB pieces of the never-written half, written through the server (so
    # into the page cache) and read back in turn, with no pause between reads.
    big = 1 << 20
    pieces = [half * 4096 + i * big for i in range(8)]
    for offset in pieces:
        h.pwrite(os.urandom(big), offset)
    h.pread(big, pieces[0])
    sleeps = loop_sleeps()
    for i in range(100):
        h.pread(big, pieces[i % len(pieces)])
    copy_sleeps = loop_sleeps() - sleeps
    report["cached_1m_reads_sleeps"] = copy_sleeps
    if copy_sleeps < 5:
        failures.append(f"1 MiB cached reads: the event loops slept {copy_sleeps} times in 100 reads; they should sleep while the page-cache thread copies")

h.shutdown()
report["failures"] = failures
print(json.dumps(report))
sys.exit(1 if failures else 0)
