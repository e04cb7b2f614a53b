#!/usr/bin/python3
# A clone of an origin that goes away and comes back. Phases, run one after another
# against the same runner export (the origin holds 0x42 everywhere):
#   fetch: read the first 8 MiB (fetched and kept)
#   down:  the origin is gone: the first 8 MiB still read; an unfetched block fails with
#          EIO within a bounded time; whole-block writes work and read back
#   back:  the origin is back: unfetched blocks read again (after the reconnect backoff)
# Usage: origin_loss.py PHASE URI
import errno
import sys
import time
import nbd

phase, uri = sys.argv[1:3]
h = nbd.NBD()
h.connect_uri(uri)
MiB = 1 << 20

if phase == "fetch":
    assert h.pread(8 * MiB, 0) == b"\x42" * (8 * MiB)
    time.sleep(0.5)  # the fetched blocks are stored behind the read
    h.flush()
elif phase == "down":
    assert h.pread(8 * MiB, 0) == b"\x42" * (8 * MiB), "fetched blocks must read without the origin"
    started = time.monotonic()
    try:
        h.pread(65536, 16 * MiB)
        sys.exit("an unfetched block read without its origin")
    except nbd.Error as error:
        assert error.errnum == errno.EIO, error
        waited = time.monotonic() - started
        assert waited < 25, f"the failure took {waited:.1f} s"
        print(f"unfetched read failed with EIO after {waited:.2f} s")
    h.pwrite(b"\x77" * 65536, 24 * MiB)
    h.flush()
    assert h.pread(65536, 24 * MiB) == b"\x77" * 65536
elif phase == "back":
    deadline = time.monotonic() + 20
    while True:
        try:
            data = h.pread(65536, 16 * MiB)
            break
        except nbd.Error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)
    assert data == b"\x42" * 65536
    assert h.pread(65536, 24 * MiB) == b"\x77" * 65536
    assert h.pread(MiB, 30 * MiB) == b"\x42" * MiB
    print("the origin is back: unfetched blocks read again")
h.shutdown()
