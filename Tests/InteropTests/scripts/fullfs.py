#!/usr/bin/python3
# A host file system that fills up under a sparse pool. Usage: fullfs.py POOL SOCKET FILLER
#   The pool lives on a small ext4 file system that also holds FILLER. Volume "v" is
#   larger than the free space. Write 1 MiB chunks (chunk i filled with byte i % 250 + 1)
#   with a flush every 4 chunks until the server answers ENOSPC; then every chunk written
#   before must read back, the pool must not be in fail mode, and after FILLER is removed
#   (space freed) writes and flushes must work again, on the same server.
import errno
import os
import sys
import nbd
from checks import check, control as control_socket, failures, has_errno

pool, sock, filler = sys.argv[1:4]
MiB = 1 << 20




def chunk(i):
    return bytes([i % 250 + 1]) * MiB


h = nbd.NBD()
h.connect_uri(f"nbd+unix:///v?socket={sock}")
size = h.get_size()
written = 0
error = None
while written * MiB < size:
    try:
        h.pwrite(chunk(written), written * MiB)
        written += 1
        if written % 4 == 0:
            h.flush()
    except nbd.Error as e:
        error = e
        break
check(error is not None, f"the whole {size >> 20} MiB volume fit: the file system never filled")
if error is not None:
    check(has_errno(error, errno.ENOSPC), f"full file system: errno {error.errno} ({error}), not ENOSPC")
print(f"{written} MiB written before ENOSPC")
check(written >= 4, f"only {written} MiB written before the file system was full")

for i in range(written):
    if h.pread(MiB, i * MiB) != chunk(i):
        failures.append(f"chunk {i} reads wrong data after ENOSPC")
        break
info = control_socket(pool, {"command": "info"})["result"]
check(info.get("state") == "ok", f"a full host file system put the pool in state {info.get('state')}: {info.get('failure')}")

os.remove(filler)
try:
    h.pwrite(chunk(written), written * MiB)
    h.flush()
    check(h.pread(MiB, written * MiB) == chunk(written), "the chunk written after freeing space reads wrong data")
    written += 1
except nbd.Error as e:
    failures.append(f"writing after space was freed failed: {e}")
h.shutdown()
print(f"WRITTEN {written}")
if failures:
    print("\n".join(failures))
    sys.exit(1)
print("full host file system: ENOSPC to the client, data kept, writes work again after freeing space")
