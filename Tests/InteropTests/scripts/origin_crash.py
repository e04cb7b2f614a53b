#!/usr/bin/python3
# kill -9 while an origin-backed clone fetches and hydrates.
# Usage: origin_crash.py THINBD POOL DIRECTORY ORIGIN_FILE ROUNDS [SEED]
#   POOL holds volume "c", cloned from ORIGIN_FILE (64 MiB, made by this script's `make`
#   phase: every block names its own number; every 16th block is zeros). Each round
#   starts `thinbd serve`, checks a sample of blocks (every written block and random
#   others: each must be the origin's bytes, or a write the server acknowledged, whole),
#   then reads random ranges (fetches), writes, zeroes or trims and flushes whole blocks, and in every
#   other round runs `thinbd hydrate` through the server, until the server is killed
#   with SIGKILL at a random moment (by its own pid). `thinbd check` must then be clean.
#   Last, the clone is hydrated to the end, the origin file is moved away, and every
#   block is checked.
import atexit
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import nbd
from checks import SERVE_TRANSMISSION

BLOCK = 4096
BLOCKS = 64 * 256  # 64 MiB


def origin_block(block):
    if block % 16 == 0:
        return bytes(BLOCK)
    head = struct.pack("<4sQ", b"ORIG", block)
    return head + bytes([block % 251 + 1]) * (BLOCK - len(head))


if sys.argv[1] == "make":
    with open(sys.argv[2], "wb") as f:
        for b in range(BLOCKS):
            f.write(origin_block(b))
    sys.exit(0)

thinbd, pool, directory, origin_file, rounds = sys.argv[1:5] + [int(sys.argv[5])]
seed = int(sys.argv[6]) if len(sys.argv) > 6 else int.from_bytes(os.urandom(4), "little")
rng = random.Random(seed)
sock = os.path.join(directory, "origin-crash.sock")
durable = {}  # block -> the content the last successful flush covers
pending = {}  # block -> contents written (or in flight) since that flush
failures = []
servers = []


@atexit.register
def stop_servers():
    # The script may fail half-way: no server it started outlives it.
    for server in servers:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGKILL)
            server.wait()


def written(round_, seq, block):
    head = struct.pack("<4sIIQ", b"WROT", round_, seq, block)
    return head + bytes([(round_ * 7 + seq) % 251 + 1]) * (BLOCK - len(head))


def serve():
    if os.path.exists(sock):
        os.remove(sock)
    server = subprocess.Popen([thinbd, "serve", pool, "--socket", sock] + SERVE_TRANSMISSION, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    servers.append(server)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if server.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"seed {seed}: serve did not start: {server.stderr.read().decode()}")
        time.sleep(0.02)
    return server


def connect():
    h = nbd.NBD()
    h.set_export_name("c")
    h.connect_unix(sock)
    return h


def allowed(block):
    options = [durable.get(block, origin_block(block))]
    options += pending.get(block, [])
    return options


def verify(h, blocks, what):
    for block in blocks:
        got = h.pread(BLOCK, block * BLOCK)
        if got not in allowed(block):
            failures.append(f"{what}: block {block} reads {got[:24]!r}..., neither the origin's nor a write's")


def reader(h, stop):
    try:
        while not stop.is_set():
            start = rng.randrange(BLOCKS - 64)
            count = rng.randrange(1, 16)
            before = {start + i: allowed(start + i) for i in range(count)}
            data = h.pread(count * BLOCK, start * BLOCK)
            for i in range(count):
                block = start + i
                # A flush may have moved a write from pending to durable meanwhile.
                if data[i * BLOCK:(i + 1) * BLOCK] not in before[block] + allowed(block):
                    failures.append(f"live read: block {block} is torn or foreign")
            time.sleep(0.002)
    except nbd.Error:
        pass  # the server was killed


def writer(h, round_, stop):
    seq = 0
    try:
        while not stop.is_set():
            for _ in range(rng.randrange(1, 6)):
                block = rng.randrange(BLOCKS)
                seq += 1
                # A quarter are WRITE_ZEROES or TRIM: the block then shares the zero block
                # (thinbd's trim of an origin-backed block reads as zeros, never the origin).
                kind = rng.randrange(8)
                data = bytes(BLOCK) if kind < 2 else written(round_, seq, block)
                pending.setdefault(block, []).append(data)
                if kind == 0:
                    h.zero(BLOCK, block * BLOCK)
                elif kind == 1:
                    h.trim(BLOCK, block * BLOCK)
                else:
                    h.pwrite(data, block * BLOCK)
            h.flush()
            # Everything acknowledged before the flush is durable now.
            for block, contents in list(pending.items()):
                durable[block] = contents[-1]
            pending.clear()
    except nbd.Error:
        pass


for round_ in range(1, rounds + 1):
    server = serve()
    h = connect()
    sample = set(durable) | set(pending) | {rng.randrange(BLOCKS) for _ in range(200)}
    verify(h, sorted(sample), f"round {round_} start")
    # What survived is all there is now: unflushed writes either landed or not.
    for block in sample:
        got = h.pread(BLOCK, block * BLOCK)
        if block in durable or block in pending:
            durable[block] = got
    pending.clear()
    stop = threading.Event()
    threads = [threading.Thread(target=reader, args=(connect(), stop)), threading.Thread(target=writer, args=(connect(), round_, stop))]
    for t in threads:
        t.start()
    hydrate = None
    if round_ % 2 == 0:
        hydrate = subprocess.Popen([thinbd, "hydrate", pool, "c", "--rate", "8M"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(0.3, 1.5))
    os.kill(server.pid, signal.SIGKILL)
    server.wait()
    stop.set()
    for t in threads:
        t.join()
    if hydrate is not None:
        hydrate.wait()
    check = subprocess.run([thinbd, "check", pool], capture_output=True, text=True)
    if check.returncode != 0 or "clean" not in check.stdout:
        failures.append(f"round {round_}: check: {check.stdout}{check.stderr}")
        break
    if failures:
        break

fetched_before_hydrate = None
if not failures:
    listing = subprocess.run([thinbd, "volume", "list", pool, "--json"], capture_output=True, text=True)
    fetched_before_hydrate = json.loads(listing.stdout)[0]["mapped_bytes"]
    hydrate = subprocess.run([thinbd, "hydrate", pool, "c"], capture_output=True, text=True)
    if hydrate.returncode != 0:
        failures.append(f"final hydrate: {hydrate.stdout}{hydrate.stderr}")
    else:
        os.rename(origin_file, origin_file + ".gone")
        server = serve()
        h = connect()
        verify(h, range(BLOCKS), "after hydration, without the origin")
        h.shutdown()
        server.send_signal(signal.SIGTERM)
        server.wait()
        os.rename(origin_file + ".gone", origin_file)

if failures:
    print(f"seed {seed}:")
    for f in failures[:20]:
        print(f)
    sys.exit(1)
print(f"seed {seed}: {rounds} kill -9 rounds during fetches and hydration, no torn block, check clean "
      f"({fetched_before_hydrate / 1048576:.1f} MiB of 64 MiB local after them); hydrated clone reads right without its origin")
