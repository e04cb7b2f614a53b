#!/usr/bin/python3
# kill -9 crash rounds. Usage: crash_rounds.py THINBD POOL DIRECTORY ROUNDS [SEED]
#   Each round starts `thinbd serve` on POOL (a volume "v" of at least 64 MiB), checks that
#   every block the model holds reads back as a write the server acknowledged (the last
#   flushed one, or one written after that flush), then two libnbd connections write
#   random 4 KiB blocks that name their round, writer and sequence number, each flushing
#   every few writes, until the server is killed with SIGKILL at a random moment (by its
#   own pid). `thinbd check` must then be clean before the next round.
#   THINBD_CRASH_SNAPSHOTS=1: each round after the first starts with a snapshot of "v", so
#   the blocks written so far are shared again and the round's first writes to them are
#   copy-on-write copies (each snapshot must then still hold what was durable when it
#   was taken).
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

thinbd, pool, directory, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
seed = int(sys.argv[5]) if len(sys.argv) > 5 else int.from_bytes(os.urandom(4), "little")
rng = random.Random(seed)
sock = os.path.join(directory, "crash.sock")
BLOCK = 4096
BLOCKS = 64 * 256  # 64 MiB
durable = {}  # block -> the content the last successful flush covers
pending = {}  # block -> contents written (or in flight) since that flush
failures = []


def content(round_, writer, seq, block):
    head = struct.pack("<4sIIIQ", b"TBDC", round_, writer, seq, block)
    return head + bytes([(round_ * 7 + writer * 13 + seq) % 251 + 1]) * (BLOCK - len(head))


def serve():
    if os.path.exists(sock):
        os.remove(sock)
    # THINBD_CRASH_SERVE_ARGS: extra serve arguments, e.g. "--no-flush *" to see the
    # rounds catch a server whose FLUSH does not make writes durable.
    extra = os.environ.get("THINBD_CRASH_SERVE_ARGS", "").split()
    server = subprocess.Popen([thinbd, "serve", pool, "--socket", sock, "--no-control"] + extra + SERVE_TRANSMISSION,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start: {server.stderr.read().decode()}")
        time.sleep(0.01)
    return server


SNAPSHOTS = os.environ.get("THINBD_CRASH_SNAPSHOTS") == "1"
snapshots = {}  # snapshot name -> {block: content} when it was taken


def verify_snapshots():
    for name, expected in snapshots.items():
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///{name}?socket={sock}")
        for block, data in expected.items():
            if bytes(h.pread(BLOCK, block * BLOCK)) != data:
                failures.append(f"snapshot {name}: block {block} changed")
                break
        h.shutdown()


def verify(round_):
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///v?socket={sock}")
    for block in sorted(set(durable) | set(pending)):
        data = bytes(h.pread(BLOCK, block * BLOCK))
        allowed = set(pending.get(block, []))
        # Never flushed: the block may still read as it was before (zeros).
        allowed.add(durable.get(block, bytes(BLOCK)))
        if data not in allowed:
            failures.append(f"round {round_}: block {block} holds neither its flushed write nor a later one "
                            f"(starts {data[:24]!r})")
            if len(failures) > 10:
                break
        else:
            # What survived is now the block's content for later rounds.
            durable[block] = data
    pending.clear()
    h.shutdown()


def writer(round_, index, stop):
    h = nbd.NBD()
    try:
        h.connect_uri(f"nbd+unix:///v?socket={sock}")
    except nbd.Error:
        return
    mine = random.Random(seed * 1000 + round_ * 10 + index)
    written = []
    seq = 0
    try:
        while not stop.is_set():
            # Each writer owns alternate blocks, so the two never race on one block.
            block = mine.randrange(BLOCKS // 2) * 2 + index
            data = content(round_, index, seq, block)
            seq += 1
            pending.setdefault(block, []).append(data)  # in flight: may or may not land
            h.pwrite(data, block * BLOCK)
            written.append((block, data))
            if seq % 8 == 0:
                h.flush()
                for b, d in written:
                    durable[b] = d
                    # Older writes to b are overwritten for good: no longer acceptable.
                    queue = pending[b]
                    del queue[:queue.index(d) + 1]
                written.clear()
    except nbd.Error:
        pass  # the server was killed


stats = {"writes": 0}
for round_ in range(rounds):
    if SNAPSHOTS and round_ > 0:
        name = f"v@round{round_}"
        taken = subprocess.run([thinbd, "snapshot", pool, name], capture_output=True, text=True)
        if taken.returncode != 0:
            failures.append(f"round {round_}: snapshot failed:\n{taken.stdout}{taken.stderr}")
            break
    server = serve()
    verify(round_)
    if SNAPSHOTS and round_ > 0:
        # Nothing was written between the snapshot and verify(), which settled every
        # block of "v": the snapshot holds exactly that.
        snapshots[name] = dict(durable)
    stop = threading.Event()
    threads = [threading.Thread(target=writer, args=(round_, i, stop)) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(rng.uniform(0.05, 0.6))
    os.kill(server.pid, signal.SIGKILL)  # by its own pid
    server.wait()
    stop.set()
    for t in threads:
        t.join()
    checked = subprocess.run([thinbd, "check", pool], capture_output=True, text=True)
    if checked.returncode != 0:
        failures.append(f"round {round_}: check after kill -9 failed:\n{checked.stdout}{checked.stderr}")
    if failures:
        break

if not failures:
    server = serve()
    verify(rounds)
    verify_snapshots()
    server.send_signal(signal.SIGTERM)
    server.wait()
print(f"crash rounds: seed {seed}, {rounds} rounds, {len(durable)} blocks verified after the last round")
if failures:
    print("\n".join(failures))
    sys.exit(1)
