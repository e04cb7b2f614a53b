#!/usr/bin/python3
# Pool commands against a live server (through its control socket), with libnbd clients.
# Usage: live_ops.py THINBD POOL SOCKET load|manage
#   load:
#   1. While 4 connections write numbered blocks to volume "vm" (and fio, started by the
#      test, writes elsewhere in it), `thinbd snapshot` takes vm@live: every block holds a
#      write that was replied to before the command started, or a later one, and none
#      submitted after it returned. `thinbd check` runs read-only meanwhile.
#   manage (once fio is done):
#   2. 8 racing `snapshot --if-missing` processes create one snapshot.
#   3. delete/rollback of a volume with a client are refused; --force disconnects it.
import json
import subprocess
import sys
import threading
import time
import nbd

thinbd, pool, sock, phase = sys.argv[1:5]
BLOCK = 4096
BLOCKS = 512
WRITERS = 4
failures = []


def uri(export):
    return f"nbd+unix:///{export}?socket={sock}"


def cli(*args):
    return subprocess.run([thinbd, *args], capture_output=True, text=True, timeout=120)


def block_bytes(i, r):
    return (i.to_bytes(8, "little") + r.to_bytes(8, "little")) * (BLOCK // 16)


def decode(data, i):
    if data == bytes(BLOCK):
        return 0
    r = int.from_bytes(data[8:16], "little")
    if data != block_bytes(i, r):
        return None
    return r


def load_phase():
    stop = threading.Event()
    history = {}  # block -> [(round, submitted, replied)]
    lock = threading.Lock()
    max_stall = [0.0]

    def writer(k):
        h = nbd.NBD()
        h.connect_uri(uri("vm"))
        r = 0
        while not stop.is_set():
            r += 1
            for i in range(k, BLOCKS, WRITERS):
                t_sub = time.monotonic()
                h.pwrite(block_bytes(i, r), i * BLOCK)
                t_rep = time.monotonic()
                max_stall[0] = max(max_stall[0], t_rep - t_sub)
                with lock:
                    history.setdefault(i, []).append((r, t_sub, t_rep))
                if stop.is_set():
                    break
        h.flush()
        h.shutdown()

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(WRITERS)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    snap = cli("snapshot", pool, "vm@live", "--json")
    t1 = time.monotonic()
    check = cli("check", pool)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()

    if snap.returncode != 0:
        failures.append(f"live snapshot failed: {snap.stderr}")
    elif json.loads(snap.stdout).get("created") is not True:
        failures.append(f"live snapshot not created: {snap.stdout}")
    if check.returncode != 0 or "clean" not in check.stdout:
        failures.append(f"live check: rc {check.returncode}: {check.stdout} {check.stderr}")

    h = nbd.NBD()
    h.connect_uri(uri("vm@live"))
    if not h.is_read_only():
        failures.append("vm@live export is writable")
    image = h.pread(BLOCKS * BLOCK, 0)
    h.shutdown()
    writes_before = writes_after = 0
    for i in range(BLOCKS):
        got = decode(image[i * BLOCK:(i + 1) * BLOCK], i)
        entries = history.get(i, [])
        before = max([r for r, _, rep in entries if rep < t0], default=0)
        after = min([r for r, sub, _ in entries if sub > t1], default=None)
        writes_before += sum(1 for _, _, rep in entries if rep < t0)
        writes_after += sum(1 for _, sub, _ in entries if sub > t1)
        if got is None:
            failures.append(f"block {i}: torn or foreign data in the snapshot")
        elif got < before:
            failures.append(f"block {i}: snapshot has round {got}, but round {before} was replied to before the snapshot")
        elif after is not None and got >= after:
            failures.append(f"block {i}: snapshot has round {got}, submitted after the snapshot returned (first such {after})")
        if len(failures) > 5:
            break
    if writes_before < BLOCKS or writes_after < WRITERS:
        failures.append(f"too little load around the snapshot: {writes_before} writes before, {writes_after} after")
    print(f"snapshot took {(t1 - t0) * 1000:.1f} ms under load; {writes_before} writes before, {writes_after} after; "
          f"longest write {max_stall[0] * 1000:.1f} ms")


def manage_phase():
    # --- 2. --if-missing races against the server -----------------------------------------
    racers = [subprocess.Popen([thinbd, "snapshot", pool, "vm@gold", "--if-missing", "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
    created = 0
    for p in racers:
        out, err = p.communicate(timeout=120)
        if p.returncode != 0:
            failures.append(f"racing snapshot failed: {err}")
        elif json.loads(out)["created"]:
            created += 1
    if created != 1:
        failures.append(f"{created} racing --if-missing commands created vm@gold (want 1)")

    # --- 3. refusing and forcing -----------------------------------------------------------
    client = nbd.NBD()
    client.connect_uri(uri("vm"))
    for args in (["volume", "delete", pool, "vm"], ["rollback", pool, "vm@gold"],
                 ["volume", "resize", pool, "vm", "--size", "1M"]):
        refused = cli(*args)
        if refused.returncode == 0 or "1 connected client" not in refused.stderr or "--force" not in refused.stderr:
            failures.append(f"{' '.join(args[:2])} with a client: rc {refused.returncode}: {refused.stderr}")
    listing = json.loads(cli("volume", "list", pool, "--json").stdout)
    if [v["connections"] for v in listing if v["name"] == "vm"] != [1]:
        failures.append(f"volume list does not count the client: {listing}")
    client.pwrite(b"\x99" * BLOCK, 0)
    forced = cli("rollback", pool, "vm@gold", "--force", "--json")
    if forced.returncode != 0 or json.loads(forced.stdout)["disconnected"] != 1:
        failures.append(f"rollback --force: rc {forced.returncode}: {forced.stdout} {forced.stderr}")
    try:
        client.pread(BLOCK, 0)
        failures.append("the forced-off client could still read")
    except nbd.Error:
        pass
    fresh = nbd.NBD()
    fresh.connect_uri(uri("vm"))
    gold = nbd.NBD()
    gold.connect_uri(uri("vm@gold"))
    if fresh.pread(BLOCKS * BLOCK, 0) != gold.pread(BLOCKS * BLOCK, 0):
        failures.append("vm does not read as vm@gold after the rollback")
    gold.shutdown()
    # --- 4. the control protocol without the CLI (docs/control-api.md) --------------------
    import socket
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ctl.connect(pool + ".control")
    ctl.sendall(b'{"command":"hello"}\n{"command":"exports"}\n{"command":"explode"}\n{"command":"delete","name":"vm","force":false}\n')
    # Half-close, as `printf ... | socat` does: every reply still arrives, then the end.
    ctl.shutdown(socket.SHUT_WR)
    buffered = b""
    while True:
        chunk = ctl.recv(65536)
        if not chunk:
            break
        buffered += chunk
    ctl.close()
    replies = [json.loads(line) for line in buffered.split(b"\n") if line]
    if len(replies) != 4:
        failures.append(f"raw control socket: {len(replies)} replies")
    else:
        hello, exports, bad, refused = replies
        if not (hello["ok"] and hello["result"]["protocol"] == 1 and hello["result"]["served"]):
            failures.append(f"hello: {hello}")
        if not (exports["ok"] and {"name": "vm", "connections": 1} in exports["result"]):
            failures.append(f"exports: {exports}")
        if bad["ok"] or bad["error"]["code"] != "invalid-request":
            failures.append(f"unknown command: {bad}")
        if refused["ok"] or refused["error"]["code"] != "in-use":
            failures.append(f"delete with a client: {refused}")

    # A renamed volume keeps its clients, and they still count under the new name.
    renamed = cli("volume", "rename", pool, "vm", "vm2")
    if renamed.returncode != 0:
        failures.append(f"rename with a client: {renamed.stderr}")
    refused = cli("volume", "delete", pool, "vm2")
    if refused.returncode == 0 or "1 connected client" not in refused.stderr:
        failures.append(f"delete of a renamed volume with a client: rc {refused.returncode}: {refused.stderr}")
    fresh.pwrite(b"\x42" * BLOCK, 0)
    fresh.flush()
    cli("volume", "rename", pool, "vm2", "vm")

    deleted = cli("volume", "delete", pool, "vm@live", "--force")
    if deleted.returncode != 0:
        failures.append(f"delete of an unused snapshot: {deleted.stderr}")
    fresh.shutdown()


load_phase() if phase == "load" else manage_phase()
for f in failures:
    print("FAIL:", f)
sys.exit(1 if failures else 0)
