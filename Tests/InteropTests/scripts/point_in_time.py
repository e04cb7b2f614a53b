#!/usr/bin/python3
# While the origin is written, its snapshot and a clone of it keep their point-in-time
# image. Usage: point_in_time.py ORIGIN_URI SNAPSHOT_URI CLONE_URI SIZE PATTERN_BYTE
import sys
import threading
import nbd

origin_uri, snapshot_uri, clone_uri = sys.argv[1:4]
size = int(sys.argv[4])
pattern = bytes([int(sys.argv[5])])
expected = pattern * size
failures = []


def writer():
    h = nbd.NBD()
    h.connect_uri(origin_uri)
    for i in range(0, size, 65536):
        h.pwrite(b"\x77" * 65536, i)
        if i % (1 << 20) == 0:
            h.flush()
    h.flush()
    h.shutdown()


def reader(uri, rounds):
    h = nbd.NBD()
    h.connect_uri(uri)
    for _ in range(rounds):
        if h.pread(size, 0) != expected:
            failures.append(f"{uri} changed while the origin was written")
            break
    h.shutdown()


threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(u, 5)) for u in (snapshot_uri, clone_uri)]
for t in threads:
    t.start()
for t in threads:
    t.join()

# The origin now holds the new data; the clone diverges on its own.
h = nbd.NBD()
h.connect_uri(origin_uri)
if h.pread(size, 0) != b"\x77" * size:
    failures.append("origin does not hold its new data")
h.shutdown()
c = nbd.NBD()
c.connect_uri(clone_uri)
c.pwrite(b"\x55" * 4096, 0)
c.shutdown()
s = nbd.NBD()
s.connect_uri(snapshot_uri)
if s.pread(size, 0) != expected:
    failures.append("snapshot changed after the clone was written")
s.shutdown()
if failures:
    print(*failures, sep="\n")
    sys.exit(1)
print("ok")
