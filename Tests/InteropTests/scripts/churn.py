"""Connection churn leaks nothing: thousands of libnbd connects and disconnects (each
negotiating an export and reading a block) at about 1,000 per second, then the
server's descriptors, memory and metrics series are compared with before.

Usage: churn.py SOCKET CONTROL_SOCKET COUNT
Every tenth connection opens a new ephemeral name (the server runs with
--ephemeral 'churn-*=blank:1M' --ephemeral-grace 0), made and deleted with its series.
Prints one JSON line of figures; exits 1 on a leak.
"""
import json
import os
import socket
import sys
import threading
import time
import urllib.request

import nbd

socket_path, control_path, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
uri = f"nbd+unix:///disk?socket={socket_path}"

# The server's pid and metrics URL, from the control socket's hello.
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:
    control.connect(control_path)
    control.sendall(b'{"command": "hello"}\n')
    reply = b""
    while not reply.endswith(b"\n"):
        reply += control.recv(65536)
hello = json.loads(reply)["result"]
pid, metrics_url = hello["pid"], hello["metrics"]


def rss_kib():
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def descriptors():
    return len(os.listdir(f"/proc/{pid}/fd"))


def series():
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


next_name = [0]


def churn(total, threads=8):
    done = [0]
    errors = []
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if done[0] >= total:
                    return
                done[0] += 1
                number = next_name[0]
                next_name[0] += 1
            try:
                h = nbd.NBD()
                h.connect_uri(uri if number % 10 else f"nbd+unix:///churn-{number}?socket={socket_path}")
                h.pread(4096, 0)
                h.shutdown()
            except Exception as error:
                errors.append(str(error))

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    started = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return total / (time.monotonic() - started), errors


# Warm-up: loop queues, metadata cache, metric series of the export, malloc arenas.
churn(2000)
time.sleep(2)  # the last ephemeral volumes go (grace 0) with their series
before = (descriptors(), rss_kib(), series())
rate, errors = churn(count)
time.sleep(2)
after = (descriptors(), rss_kib(), series())
figures = {
    "connections": count, "per_second": round(rate), "errors": len(errors),
    "fds_before": before[0], "fds_after": after[0], "rss_before_mib": round(before[1] / 1024, 1),
    "rss_after_mib": round(after[1] / 1024, 1), "series_before": before[2], "series_after": after[2],
}
print(json.dumps(figures))
failures = []
if errors:
    failures.append(f"{len(errors)} connections failed, first: {errors[0]}")
if after[0] > before[0]:
    failures.append(f"descriptors grew from {before[0]} to {after[0]}")
if after[2] != before[2]:
    failures.append(f"metric series went from {before[2]} to {after[2]}")
# Memory may move by allocator noise, not with the number of connections.
if after[1] > before[1] + 8 * 1024:
    failures.append(f"memory grew from {before[1]} KiB to {after[1]} KiB")
for failure in failures:
    print("FAIL:", failure, flush=True)
sys.exit(1 if failures else 0)
