#!/usr/bin/python3
# thinbd:changed: through python3-libnbd: LIST with the namespace query, two contexts
# in one BLOCK_STATUS, REQ_ONE, a rename of the base (the context follows it) and its
# deletion (BLOCK_STATUS then fails). Prints the changed ranges as "offset length".
# Usage: changed_context.py URI BASE EXPECTED_BASES THINBD POOL RENAMED
import errno
import subprocess
import sys
import nbd

uri, base, expected, thinbd, pool, renamed = sys.argv[1:7]
changed = "thinbd:changed:" + base

h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri)
h.add_meta_context("thinbd:changed:")
listed = []
h.opt_list_meta_context(lambda name: listed.append(name))
assert sorted(listed) == sorted("thinbd:changed:" + b for b in expected.split(",")), listed
h.clear_meta_contexts()
h.add_meta_context("base:allocation")
h.add_meta_context(changed)
h.opt_go()
assert h.can_meta_context("base:allocation") and h.can_meta_context(changed)
size = h.get_size()


def status(offset, length, flags=0):
    replies = {}

    def record(name, start, entries, error):
        assert start == offset, (start, offset)
        assert name not in replies, f"two chunks for {name}"
        replies[name] = list(zip(entries[::2], entries[1::2]))

    h.block_status(length, offset, record, flags=flags)
    assert set(replies) == {"base:allocation", changed}, replies.keys()
    return replies


def merged(runs):
    out = []
    for start, length in runs:
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((start, length))
    return out


ranges = []
offset = 0
while offset < size:
    reply = status(offset, min(size - offset, 1 << 30))[changed]
    for length, flags in reply:
        assert flags in (0, 1), flags
        if flags & 1:
            ranges.append((offset, length))
        offset += length
ranges = merged(ranges)
one = status(0, 4096, nbd.CMD_FLAG_REQ_ONE)
assert all(len(e) == 1 and e[0][0] <= 4096 for e in one.values()), one

subprocess.run([thinbd, "volume", "rename", pool, base, renamed], check=True, stdout=subprocess.DEVNULL)
after = []
offset = 0
while offset < size:
    for length, flags in status(offset, size - offset)[changed]:
        if flags & 1:
            after.append((offset, length))
        offset += length
assert merged(after) == ranges, "the context changed when its base was renamed"

subprocess.run([thinbd, "volume", "delete", pool, renamed], check=True, stdout=subprocess.DEVNULL)
try:
    status(0, 4096)
    sys.exit("BLOCK_STATUS succeeded against a deleted base")
except nbd.Error as error:
    assert error.errnum == errno.EINVAL, str(error)
h.shutdown()
for start, length in ranges:
    print(start, length)
