#!/usr/bin/python3
# A clone of an origin that goes away and comes back. Phases, run one after another
# against the same runner export (the origin holds 0x42 everywhere):
#   fetch: read the first 8 MiB (fetched and kept)
#   down:  the origin is gone: the first 8 MiB still read; an unfetched block fails with
#          EIO within a bounded time; whole-block writes work and read back
#   back:  the origin is back: unfetched blocks read again (after the reconnect backoff)
#   (with METRICS, the runner's metrics URL: thinbd_origin_up and the counters agree)
# Usage: origin_loss.py PHASE URI [METRICS]
import errno
import sys
import time
import urllib.request
import nbd

phase, uri = sys.argv[1:3]
metrics_url = sys.argv[3] if len(sys.argv) > 3 else None


def metric(name):
    text = urllib.request.urlopen(metrics_url).read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{")]
    return values[0] if values else None

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
    if metrics_url:
        assert metric("thinbd_origin_up") == 0, metric("thinbd_origin_up")
        assert metric("thinbd_origin_errors_total") >= 1
        print("metrics: thinbd_origin_up 0, errors counted")
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
    if metrics_url:
        assert metric("thinbd_origin_up") == 1, metric("thinbd_origin_up")
        assert metric("thinbd_origin_bytes_fetched_total") >= 8 * MiB + 65536
        print("metrics: thinbd_origin_up 1, bytes fetched counted")
h.shutdown()
