#!/usr/bin/python3
# An incremental backup with stock libnbd: IMAGE holds a copy of BASE; only the ranges
# of the export that thinbd:changed:BASE reports as changed are read and written over
# it. Prints the bytes copied. Usage: incremental_backup.py URI BASE IMAGE
import sys
import nbd

uri, base, image = sys.argv[1:4]
context = "thinbd:changed:" + base
h = nbd.NBD()
h.add_meta_context(context)
h.connect_uri(uri)
if not h.can_meta_context(context):
    sys.exit(f"the server does not offer {context}")
size = h.get_size()
offset = copied = 0
with open(image, "r+b") as out:
    out.truncate(size)
    while offset < size:
        extents = []
        h.block_status(min(size - offset, 1 << 30), offset,
                       lambda name, start, entries, error: extents.extend(zip(entries[::2], entries[1::2])) if name == context else 0)
        for length, flags in extents:
            length = min(length, size - offset)
            if flags & 1:
                for chunk in range(offset, offset + length, 1 << 22):
                    out.seek(chunk)
                    out.write(h.pread(min(1 << 22, offset + length - chunk), chunk))
                copied += length
            offset += length
h.shutdown()
print(copied)
