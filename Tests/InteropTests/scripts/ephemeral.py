"""Ephemeral exports with real libnbd clients.

Usage: ephemeral.py SOCKET GOLDEN_BYTE
The server runs with --ephemeral 'build-*=base@golden' --ephemeral 'scratch-*=blank:32M'
--ephemeral-grace 0.3 --no-flush 'scratch-*'; base@golden holds GOLDEN_BYTE in its
first MiB.
"""
import sys
import threading
import time

import nbd

socket_path = sys.argv[1]
golden = bytes([int(sys.argv[2])]) * 4096
failures = []


def uri(name):
    return f"nbd+unix:///{name}?socket={socket_path}"


def listed():
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri(""))
    names = []
    h.opt_list(lambda name, description: names.append(name) or 0)
    h.opt_abort()
    return names


def check(condition, message):
    if not condition:
        failures.append(message)


names = listed()
check("leftover" not in names, f"an ephemeral volume left by an earlier server is still there: {names}")
check(not any(n.startswith("build-") for n in names), f"ephemeral exports listed before use: {names}")

# Four connections race to open the same new name: one disk for all.
handles = [None] * 4
def open_handle(i):
    h = nbd.NBD()
    h.connect_uri(uri("build-1"))
    handles[i] = h
threads = [threading.Thread(target=open_handle, args=(i,)) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
check(all(h.can_multi_conn() for h in handles), "an ephemeral export does not offer multi-conn")
check(all(h.get_size() == 64 << 20 for h in handles), "an ephemeral clone has another size than its source")
check(all(h.pread(4096, 0) == golden for h in handles), "an ephemeral clone does not start as its source")
handles[0].pwrite(b"\x5a" * 4096, 8 << 20)
handles[0].flush()
check(all(h.pread(4096, 8 << 20) == b"\x5a" * 4096 for h in handles[1:]),
      "connections to one ephemeral name see different disks")
check("build-1" in listed(), "an ephemeral export in use is not listed")
for h in handles:
    h.shutdown()

# A reconnect within the grace period finds the same disk.
h = nbd.NBD()
h.connect_uri(uri("build-1"))
check(h.pread(4096, 8 << 20) == b"\x5a" * 4096, "a reconnect within the grace period got a new disk")
h.shutdown()

# After the last connection and the grace period, it is gone; the name starts afresh.
deadline = time.time() + 10
while "build-1" in listed() and time.time() < deadline:
    time.sleep(0.1)
check("build-1" not in listed(), "an ephemeral export outlived its connections and grace period")
h = nbd.NBD()
h.connect_uri(uri("build-1"))
check(h.pread(4096, 8 << 20) != b"\x5a" * 4096, "a deleted ephemeral export kept its data")
h.shutdown()

# Blank ephemeral volumes, with --no-flush: FLUSH and FUA answer at once.
h = nbd.NBD()
h.connect_uri(uri("scratch-a"))
check(h.get_size() == 32 << 20, f"blank ephemeral size {h.get_size()}")
check(h.pread(4096, 0) == bytes(4096), "a blank ephemeral volume is not zero")
h.pwrite(b"\x11" * 4096, 0, nbd.CMD_FLAG_FUA)
h.flush()
check(h.pread(4096, 0) == b"\x11" * 4096, "a --no-flush export lost a write")
h.shutdown()

# A name no rule covers is still unknown.
h = nbd.NBD()
try:
    h.connect_uri(uri("other-1"))
    failures.append("a name no --ephemeral rule covers was served")
except nbd.Error:
    pass

if failures:
    print(*failures, sep="\n")
    sys.exit(1)
print("ok")
