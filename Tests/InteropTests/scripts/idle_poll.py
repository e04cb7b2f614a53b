#!/usr/bin/python3
# An event loop's poll before it sleeps (serve --idle-poll), seen from a real client at
# queue depth 1. Usage: idle_poll.py URI SERVER_PID WINDOW_US
#
# 1. Back-to-back reads, writes and flushes: each must be answered long before the poll
#    window ends. A poll that held a request (or an off-loop write's completion) until
#    its window ran out would make each take at least WINDOW_US.
# 2. Reads with pauses of a fifth of the window: the poll must be running during them,
#    so the server's CPU time grows by a good part of the pauses.
# 3. Reads with pauses of twice the window: no poll can catch those, so polling must
#    stop after a few, and the server's CPU time grows by a few windows at most.
# Prints one JSON object; exits non-zero when a check fails.
import json
import os
import random
import sys
import time
import nbd

uri, pid, window_us = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
window = window_us / 1e6
ticks = os.sysconf("SC_CLK_TCK")


def server_cpu():
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / ticks


h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
blocks = size // 4096
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
    # Half the window: far above a real request here (tens of microseconds), far below
    # what a poll holding each request would cost.
    if total / count >= window / 2:
        failures.append(f"{label}: mean {total / count * 1e6:.0f} us against a {window_us} us window")


timed("reads", 300, lambda: h.pread(4096, rng.randrange(blocks) * 4096))
timed("writes", 300, lambda: h.pwrite(data, rng.randrange(blocks) * 4096))
timed("flushes", 20, lambda: h.flush())


def paused_reads(count, pause):
    before = server_cpu()
    for _ in range(count):
        h.pread(4096, rng.randrange(blocks) * 4096)
        time.sleep(pause)
    return server_cpu() - before


short = paused_reads(100, window / 5)
report["short_pauses_cpu_s"] = round(short, 3)
# The pauses add up to 20 windows' fifths (4 windows); polling through them costs
# about that much CPU. Without polling the server uses well under a tenth of it.
if short < 100 * window / 5 / 4:
    failures.append(f"short pauses: the server used {short:.3f} s of CPU; a poll through them would use about {100 * window / 5:.3f}")

long_pauses = paused_reads(40, window * 2)
report["long_pauses_cpu_s"] = round(long_pauses, 3)
# Halving from the full window costs about two windows in all; polling every pause
# would cost 40.
if long_pauses > 10 * window:
    failures.append(f"long pauses: the server used {long_pauses:.3f} s of CPU; polling should have stopped after a few windows")

h.shutdown()
report["failures"] = failures
print(json.dumps(report))
sys.exit(1 if failures else 0)
