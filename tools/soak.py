"""Soak: many connections doing verified I/O for a long time, with the server's memory
and descriptors sampled throughout.

Usage: soak.py THINBD [--seconds S] [--connections N] [--exports E] [--dir DIR]

E exports of 64 MiB; N fio connections spread evenly over them, each writing 4 KiB
random blocks in a region of its own with crc32c verification (verify_backlog, so
data is checked while the load runs, not only at the end). Then `thinbd check` on the
served pool. Prints one JSON line of figures and exits 1 on any error, data mismatch,
unclean check or memory that kept growing.
"""
import argparse
import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

parser = argparse.ArgumentParser()
parser.add_argument("thinbd")
parser.add_argument("--seconds", type=int, default=600)
parser.add_argument("--connections", type=int, default=512)
parser.add_argument("--exports", type=int, default=32)
parser.add_argument("--dir", default=None)
parser.add_argument("--transmission", choices=["lean", "nio"], help="serve --transmission (default: serve's own)")
args = parser.parse_args()

thinbd = os.path.abspath(args.thinbd)
work = args.dir or tempfile.mkdtemp(prefix="thinbd-soak-")
pool = os.path.join(work, "pool")
sock = os.path.join(work, "nbd.sock")
per_export = max(1, args.connections // args.exports)
region = (64 << 20) // per_export // 4096 * 4096


def run(*command):
    return subprocess.run([str(c) for c in command], check=True, capture_output=True, text=True)


for leftover in (pool, pool + ".control"):
    if os.path.exists(leftover):
        os.remove(leftover)
run(thinbd, "create", pool, "--size", f"{args.exports * 64 + 512}M")
for i in range(args.exports):
    run(thinbd, "volume", "create", pool, f"soak-{i}", "--size", "64M")

server = subprocess.Popen(
    [thinbd, "serve", pool, "--socket", sock, "--json", "--max-connections", str(args.connections + 64)]
    + (["--transmission", args.transmission] if args.transmission else []),
    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_server():
    """Stops the server by its pid, whatever ended the script: a failure before the end
    once left one running after its test had finished."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


atexit.register(stop_server)
pid = json.loads(server.stdout.readline())["pid"]


def rss_kib():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def descriptors():
    return len(os.listdir(f"/proc/{pid}/fd"))


samples = []
stop = threading.Event()


def sampler():
    while not stop.is_set():
        samples.append((time.monotonic(), rss_kib(), descriptors()))
        stop.wait(2)


# Connections first: each swift-nio loop makes its disk queue (a few descriptors) on its
# first connection and keeps it, so "idle" is measured after that. Four, one after
# another, reach every loop of a 2-core machine while accepts alternate between loops;
# if they stopped alternating (every connection on one loop, as once happened when each
# hand-off to a lean loop also stepped the group's round-robin), a loop's first
# connection would come during the load and the descriptor check below would fail.
warm = [subprocess.run(["nbdinfo", f"nbd+unix:///soak-{i}?socket={sock}"], capture_output=True) for i in range(4)]
idle_rss, idle_fds = rss_kib(), descriptors()
threading.Thread(target=sampler, daemon=True).start()

jobs = ["[global]", "ioengine=nbd", "thread=1", "rw=randwrite", "bs=4k", "iodepth=1", "time_based",
        f"runtime={args.seconds}", "verify=crc32c", "verify_backlog=64", "verify_fatal=1", "verify_state_save=0",
        f"size={region}", f"offset_increment={region}", f"numjobs={per_export}", "group_reporting=1"]
for i in range(args.exports):
    jobs += [f"[soak-{i}]", f"uri=nbd+unix:///soak-{i}?socket={sock}"]
job_file = os.path.join(work, "soak.fio")
with open(job_file, "w") as f:
    f.write("\n".join(jobs) + "\n")

started = time.monotonic()
# In the work directory: fio may leave files of its own where it runs.
fio = subprocess.run(["fio", "--output-format=json", job_file], capture_output=True, text=True, cwd=work)
elapsed = time.monotonic() - started
stop.set()
time.sleep(2.5)
after_rss, after_fds = rss_kib(), descriptors()

failures = []
try:
    data = json.loads(fio.stdout[fio.stdout.index("{"):])
    errors = sum(job.get("error", 0) for job in data["jobs"])
    writes = sum(job["write"]["total_ios"] for job in data["jobs"])
    verified = sum(job["read"]["total_ios"] for job in data["jobs"])
except (ValueError, KeyError) as error:
    errors, writes, verified = -1, 0, 0
    failures.append(f"fio output unreadable ({error}): {fio.stderr[-500:]}")
if fio.returncode != 0 or errors != 0:
    failures.append(f"fio failed (exit {fio.returncode}, {errors} job errors): {fio.stderr[-500:]}")

check = subprocess.run([thinbd, "check", pool], capture_output=True, text=True)
if check.returncode != 0:
    failures.append(f"check: {check.stdout[-500:]}")

peak_rss = max(s[1] for s in samples)
peak_fds = max(s[2] for s in samples)
# Memory must level off: the last third's peak may not exceed the middle third's by more
# than 10% (a leak grows steadily with the requests served).
third = len(samples) // 3
if third >= 2:
    middle = max(s[1] for s in samples[third:2 * third])
    last = max(s[1] for s in samples[2 * third:])
    if last > middle * 1.1 + 4096:
        failures.append(f"memory kept growing: {middle} KiB in the middle third, {last} KiB in the last")
if after_fds > idle_fds + 2:
    failures.append(f"descriptors after the load: {after_fds}, before it: {idle_fds}")

stop_server()
figures = {
    "seconds": round(elapsed, 1), "connections": per_export * args.exports, "exports": args.exports,
    "writes": writes, "verified_reads": verified, "errors": errors, "check": "clean" if check.returncode == 0 else "damage",
    "idle_rss_mib": round(idle_rss / 1024, 1), "peak_rss_mib": round(peak_rss / 1024, 1),
    "rss_after_mib": round(after_rss / 1024, 1),
    "per_connection_kib": round((peak_rss - idle_rss) / max(1, per_export * args.exports), 1),
    "idle_fds": idle_fds, "peak_fds": peak_fds, "fds_after": after_fds,
}
print(json.dumps(figures))
for failure in failures:
    print("FAIL:", failure, file=sys.stderr)
if not args.dir:
    subprocess.run(["rm", "-rf", work])
sys.exit(1 if failures else 0)
