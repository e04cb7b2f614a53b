"""Per-export rate limits with real libnbd clients.

Usage: limits.py SOCKET THINBD POOL
The server runs with --limit 'lim-*=200'; volumes lim-a and free exist. Checks that
two connections to lim-a share 200 IOPS, that free is not held back, that a live
`thinbd limit` changes the rate of open connections, and that 0 lifts it.
"""
import json
import subprocess
import sys
import threading
import time

import nbd

socket_path, thinbd, pool = sys.argv[1], sys.argv[2], sys.argv[3]
failures = []


def uri(name):
    return f"nbd+unix:///{name}?socket={socket_path}"


def rate(handles, seconds=1.5):
    """Requests per second that `handles` complete together, 4 KiB reads at depth 1 each."""
    counts = [0] * len(handles)
    deadline = time.monotonic() + seconds

    def run(i):
        while time.monotonic() < deadline:
            handles[i].pread(4096, (counts[i] % 256) * 4096)
            counts[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(handles))]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - started)


def check(condition, message):
    if not condition:
        failures.append(message)


def limit(rule):
    result = subprocess.run([thinbd, "limit", pool, rule], capture_output=True, text=True, timeout=30)
    check(result.returncode == 0, f"thinbd limit {rule}: {result.stderr}")


limited = [nbd.NBD(), nbd.NBD()]
for h in limited:
    h.connect_uri(uri("lim-a"))
free = nbd.NBD()
free.connect_uri(uri("free"))

shared = rate(limited)
alone = rate([free])
print(f"lim-a (2 connections, limit 200): {shared:.0f} IOPS; free: {alone:.0f} IOPS", flush=True)
check(140 <= shared <= 260, f"two connections to a 200 IOPS export did {shared:.0f} IOPS together")
check(alone > 600, f"an unlimited export was held back: {alone:.0f} IOPS")

limit("lim-*=600")
raised = rate(limited)
print(f"after limit lim-*=600: {raised:.0f} IOPS", flush=True)
check(450 <= raised <= 750, f"a live limit of 600 gave {raised:.0f} IOPS")

limit("lim-*=0")
lifted = rate(limited)
print(f"after limit lim-*=0: {lifted:.0f} IOPS", flush=True)
check(lifted > 900, f"lifting the limit left {lifted:.0f} IOPS")

listed = subprocess.run([thinbd, "limit", pool, "--json"], capture_output=True, text=True, timeout=30)
check(listed.returncode == 0 and json.loads(listed.stdout) == [], f"rules after lifting: {listed.stdout} {listed.stderr}")

for h in limited + [free]:
    h.shutdown()
for failure in failures:
    print("FAIL:", failure, flush=True)
sys.exit(1 if failures else 0)
