#!/usr/bin/python3
# Flags, block status and error codes, checked with libnbd (strict mode relaxed so that
# bad requests reach the server). Usage: flags_and_errors.py WRITABLE_URI READONLY_URI
import sys
import nbd

failures = []


def check(what, condition):
    if not condition:
        failures.append(what)


def connect(uri, strict=True):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if not strict:
        h.set_strict_mode(0)
    h.connect_uri(uri)
    return h


def errno_of(call):
    try:
        call()
    except nbd.Error as e:
        return e.errno
    return None


rw = connect(sys.argv[1], strict=False)
size = rw.get_size()
check("structured replies negotiated", rw.get_structured_replies_negotiated())
check("can flush", rw.can_flush())
check("can fua", rw.can_fua())
check("can trim", rw.can_trim())
check("can zero", rw.can_zero())
check("can fast zero", rw.can_fast_zero())
check("can df", rw.can_df())
check("can cache", rw.can_cache())
check("can multi-conn", rw.can_multi_conn())
check("writable", not rw.is_read_only())
check("base:allocation", rw.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))

# Data round trip, FUA, DF, flush.
rw.pwrite(b"\xab" * 65536, 1 << 20, nbd.CMD_FLAG_FUA)
check("read back", rw.pread(65536, 1 << 20) == b"\xab" * 65536)
check("DF read", rw.pread(65536, (1 << 20) - 100, nbd.CMD_FLAG_DF)[100:] == b"\xab" * 65436)
rw.flush()

# Structured read replies: a read over a hole and data comes as a hole chunk and a data
# chunk; a read of data alone as one data chunk with the bytes.
def chunks_of(count, offset):
    seen = []
    def chunk(subbuf, off, status, error):
        seen.append((status, off, len(subbuf) if status == nbd.READ_DATA else None))
        return 0
    data = rw.pread_structured(count, offset, chunk)
    return data, seen
data, seen = chunks_of(131072, (1 << 20) - 65536)
check("hole then data: bytes", data == bytes(65536) + b"\xab" * 65536)
check("hole then data: chunks %r" % seen,
      [s for s, _, _ in seen] == [nbd.READ_HOLE, nbd.READ_DATA] and seen[1][1:] == (1 << 20, 65536))
data, seen = chunks_of(4096, (1 << 20) + 4096)
check("data alone: one data chunk %r" % seen, seen == [(nbd.READ_DATA, (1 << 20) + 4096, 4096)] and data == b"\xab" * 4096)

# Block status: the written block is data, untouched space is a zero hole.
extents = []
rw.block_status(4 << 20, 0, lambda ctx, off, ents, err: extents.extend(ents))
check("block status first extent is a hole", extents[0:2] == [1 << 20, 3])
check("block status then data", extents[2:4] == [65536, 0])
one = []
rw.block_status(4 << 20, 0, lambda ctx, off, ents, err: one.extend(ents), nbd.CMD_FLAG_REQ_ONE)
check("REQ_ONE gives one extent", len(one) == 2 and one[0] <= 4 << 20)

# Write-zeroes punches, NO_HOLE allocates, FAST_ZERO with NO_HOLE is refused.
rw.zero(65536, 1 << 20)
check("zeroed", rw.pread(65536, 1 << 20) == bytes(65536))
rw.zero(65536, 2 << 20, nbd.CMD_FLAG_NO_HOLE)
check("zero no-hole", rw.pread(65536, 2 << 20) == bytes(65536))
check("fast zero without hole is ENOTSUP", errno_of(lambda: rw.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)) == "ENOTSUP")
rw.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
rw.trim(65536, 3 << 20)
rw.cache(65536, 0)

# Errors for bad requests.
check("read past end is EINVAL", errno_of(lambda: rw.pread(512, size - 256)) == "EINVAL")
check("write past end is ENOSPC", errno_of(lambda: rw.pwrite(b"x" * 512, size - 256)) == "ENOSPC")
check("trim past end is EINVAL", errno_of(lambda: rw.trim(512, size - 256)) == "EINVAL")
check("zero past end is ENOSPC", errno_of(lambda: rw.zero(512, size - 256)) == "ENOSPC")
check("block status past end is EINVAL", errno_of(lambda: rw.block_status(512, size - 256, lambda *a: 0)) == "EINVAL")
check("unknown flag is EINVAL", errno_of(lambda: rw.pread(512, 0, 0x40)) == "EINVAL")
check("flag on wrong command is EINVAL", errno_of(lambda: rw.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_REQ_ONE)) == "EINVAL")
check("read over 32 MiB is EINVAL", errno_of(lambda: rw.pread(33 << 20, 0)) == "EINVAL")
rw.pwrite(b"\xcd" * 512, 5 << 20)
check("connection still works", rw.pread(512, 5 << 20) == b"\xcd" * 512)
rw.shutdown()

# NBD_CMD_DISC with requests still in flight: the server handles them all, and each
# still gets its reply before the connection closes (the spec's "handle all
# outstanding requests"; libnbd allows sending DISC this early).
early = connect(sys.argv[1])
early.pwrite(b"\x5a" * 65536, 6 << 20)
buffers = [nbd.Buffer(4096) for _ in range(16)]
cookies = [early.aio_pread(buffers[i], (6 << 20) + i * 4096) for i in range(16)]
early.aio_disconnect(0)
while not early.aio_is_closed() and not early.aio_is_dead():
    early.poll(1000)
answered = 0
for i, cookie in enumerate(cookies):
    try:
        if early.aio_command_completed(cookie) and buffers[i].to_bytearray() == b"\x5a" * 4096:
            answered += 1
    except nbd.Error:
        pass
check("every READ in flight at NBD_CMD_DISC answered (%d of 16)" % answered, answered == 16)

ro = connect(sys.argv[2], strict=False)
check("snapshot is read-only", ro.is_read_only())
check("snapshot cannot trim", not ro.can_trim())
check("write to snapshot is EPERM", errno_of(lambda: ro.pwrite(b"x" * 512, 0)) == "EPERM")
check("trim on snapshot is EPERM", errno_of(lambda: ro.trim(512, 0)) == "EPERM")
check("zero on snapshot is EPERM", errno_of(lambda: ro.zero(512, 0)) == "EPERM")
ro.pread(4096, 0)
ro.flush()
ro.shutdown()

# Unknown export names are refused with an error, not a hang.
try:
    bad = nbd.NBD()
    bad.connect_uri(sys.argv[1].replace("///", "///no-such-export-", 1))
    failures.append("unknown export accepted")
except nbd.Error:
    pass

if failures:
    print("FAILED:", *failures, sep="\n  ")
    sys.exit(1)
print("ok")
