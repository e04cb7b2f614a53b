#!/usr/bin/python3
"""The send/receive benchmark; run it through tools/bench-stream.sh.

Servers are started here on Unix sockets in a private directory, in captive mode
(`--run` reading a pipe this script holds), so they stop by themselves, and are waited
for by their own pids."""
import os
import statistics
import subprocess
import sys
import tempfile
import time

thinbd = os.path.abspath(sys.argv[1])
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
GiB = 1 << 30
SIZE = 8 * GiB
BLOCK = 65536
work = tempfile.mkdtemp(prefix="thinbd-bench-stream-")


def run(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def timed(fn):
    start = time.monotonic()
    fn()
    return time.monotonic() - start


class Served:
    def __init__(self, name):
        self.pool = f"{work}/{name}.pool"
        self.socket = f"{work}/{name}.sock"
        run(thinbd, "create", self.pool, "--size", "20G", "--block-size", "64K")
        self.process = None

    def start(self):
        self.process = subprocess.Popen(
            [thinbd, "serve", self.pool, "--socket", self.socket, "--run", "cat >/dev/null"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(500):
            if os.path.exists(self.socket):
                return
            time.sleep(0.02)
        raise SystemExit("server did not start")

    def uri(self, export):
        return f"nbd+unix:///{export}?socket={self.socket}"

    def stop(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


a, b = Served("a"), Served("b")
run(thinbd, "volume", "create", a.pool, "vm", "--size", "8G")
a.start()
b.start()
print("filling an 8 GiB volume with data ...", file=sys.stderr)
for gib in range(8):
    run("qemu-io", "-f", "raw", "-c", f"write -P 0x5a {gib}G 1G", a.uri("vm"))
run(thinbd, "snapshot", a.pool, "vm@base")
blocks = SIZE // BLOCK
changed_blocks = blocks // 100
runs = 20
per_run = changed_blocks // runs
for r in range(runs):
    first = r * (blocks // runs) + 1000
    run("qemu-io", "-f", "raw", "-c", f"write -P 0x6b {first * BLOCK} {per_run * BLOCK}", a.uri("vm"))
run(thinbd, "snapshot", a.pool, "vm@now")
changed = per_run * runs * BLOCK

diff_served = []
for _ in range(max(repeats, 5)):
    diff_served.append(timed(lambda: run(thinbd, "diff", a.pool, "vm@base", "vm@now")))
reported = sum(int(line.split()[1]) for line in run(thinbd, "diff", a.pool, "vm@base", "vm@now").stdout.split("\n") if line)

# The base reaches B once (full stream), as a runner would get it.
full_time = timed(lambda: subprocess.run(f"'{thinbd}' send '{a.pool}' vm@base | '{thinbd}' receive '{b.pool}'", shell=True, check=True, capture_output=True))
stream = f"{work}/inc.stream"
run(thinbd, "send", a.pool, "vm@now", "--from", "vm@base", "-o", stream)
stream_bytes = os.path.getsize(stream)
os.remove(stream)

incremental, convert = [], []
run(thinbd, "volume", "create", b.pool, "copy", "--size", "8G")
for i in range(repeats):
    # Interleaved: one incremental send | receive, then one full convert.
    if i > 0:
        run(thinbd, "volume", "delete", b.pool, "vm@now")
        run(thinbd, "rollback", b.pool, "vm@base")
    incremental.append(timed(lambda: subprocess.run(
        f"'{thinbd}' send '{a.pool}' vm@now --from vm@base | '{thinbd}' receive '{b.pool}'", shell=True, check=True, capture_output=True)))
    convert.append(timed(lambda: run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", a.uri("vm@now"), b.uri("copy"))))
same = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a.uri("vm@now"), b.uri("vm@now")], capture_output=True).returncode == 0
a.stop()
b.stop()
diff_offline = [timed(lambda: run(thinbd, "diff", a.pool, "vm@base", "vm@now")) for _ in range(max(repeats, 5))]
run("rm", "-rf", work)

ms = lambda xs: f"{statistics.median(xs) * 1000:.1f} ms"
inc, conv = statistics.median(incremental), statistics.median(convert)
limit = 1.02 * changed + (1 << 20)
print(f"8 GiB volume, 64 KiB blocks, {changed_blocks} of {blocks} blocks rewritten in {runs} runs; medians of {repeats} interleaved repeats")
print(f"| measure | result | target |")
print(f"| --- | --- | --- |")
print(f"| diff, served (control socket) | {ms(diff_served)} | under 100 ms |")
print(f"| diff, offline (opens the pool) | {ms(diff_offline)} | under 100 ms |")
print(f"| changed bytes (diff) | {changed:,} ({reported:,} reported) | |")
print(f"| incremental stream size | {stream_bytes:,} bytes = {stream_bytes / changed:.4f} x changed | <= {int(limit):,} (1.02 x changed + 1 MiB) |")
print(f"| incremental send \\| receive, served to served | {ms(incremental)} ({changed / inc / (1 << 20):.0f} MiB/s of changes) | |")
print(f"| qemu-img convert of the whole image, NBD to NBD | {ms(convert)} ({SIZE / conv / (1 << 20):.0f} MiB/s) | |")
print(f"| convert time / incremental time | {conv / inc:.1f}x | at least 20x |")
print(f"| full send \\| receive of the base (once) | {full_time:.1f} s | |")
print(f"| received image = sent image (qemu-img compare) | {'yes' if same else 'NO'} | |")
