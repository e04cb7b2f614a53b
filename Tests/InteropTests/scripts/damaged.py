#!/usr/bin/python3
# A served pool with a damaged mapping leaf. Usage: damaged.py POOL SOCKET
#   Volume "good" holds 16 blocks of 64 KiB, block i filled with byte i+1; volume "bad"
#   holds 3 blocks, and the test rewrote its leaf so that block 1 maps past the pool
#   (with a valid CRC). Every undamaged read must work, the damaged block must fail with
#   EIO, the pool must then refuse writes and flushes, and info and the metrics must say
#   so; reads keep working afterwards.
import errno
import sys
import urllib.request
import nbd
from checks import check, control as control_socket, failures, has_errno

pool, sock = sys.argv[1:3]
BLOCK = 64 << 10





def connect(export):
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///{export}?socket={sock}")
    return h


def read_good(h, label):
    for i in range(16):
        data = h.pread(BLOCK, i * BLOCK)
        check(data == bytes([i + 1]) * BLOCK, f"{label}: good block {i} reads wrong data")


good = connect("good")
bad = connect("bad")
read_good(good, "before")
check(bad.pread(BLOCK, 0) == b"\x01" * BLOCK, "bad block 0 (undamaged) reads wrong data")
check(control_socket(pool, {"command": "info"})["result"]["state"] == "ok", "state before the damage is met")

try:
    bad.pread(BLOCK, BLOCK)
    failures.append("reading the damaged block succeeded")
except nbd.Error as error:
    check(has_errno(error, errno.EIO), f"damaged block: errno {error.errno}, not EIO")

# The connection that met the damage still serves its undamaged range; the others too.
check(bad.pread(BLOCK, 0) == b"\x01" * BLOCK, "bad block 0 after the damage")
check(bad.pread(BLOCK, 2 * BLOCK) == b"\x03" * BLOCK, "bad block 2 after the damage")
read_good(good, "after")
fresh = connect("good")
read_good(fresh, "new connection")

for what, attempt in [
    ("write", lambda: good.pwrite(b"x" * 4096, 0)),
    ("write-zeroes", lambda: good.zero(BLOCK, 0)),
    ("flush", lambda: good.flush()),
]:
    try:
        attempt()
        failures.append(f"{what} succeeded in fail mode")
    except nbd.Error as error:
        check(has_errno(error, errno.EIO), f"{what}: errno {error.errno}, not EIO")
read_good(good, "after refused writes")

info = control_socket(pool, {"command": "info"})["result"]
check(info["state"] == "failed", f"info state: {info.get('state')}")
check("corrupt block" in (info.get("failure") or ""), f"info failure: {info.get('failure')}")
snapshot = control_socket(pool, {"command": "snapshot", "name": "good@after"})
check(not snapshot["ok"] and snapshot["error"]["code"] == "corrupt", f"snapshot in fail mode: {snapshot}")

metrics_url = control_socket(pool, {"command": "hello"})["result"]["metrics"]
with urllib.request.urlopen(metrics_url, timeout=10) as response:
    text = response.read().decode()
check("thinbd_pool_damaged 1" in text, "metrics: " + "".join(line for line in text.splitlines() if "damaged" in line))

for h in (good, bad, fresh):
    h.shutdown()
if failures:
    print("\n".join(failures))
    sys.exit(1)
print("damaged pool: undamaged reads served, damaged block EIO, writes and flush refused, state failed")
