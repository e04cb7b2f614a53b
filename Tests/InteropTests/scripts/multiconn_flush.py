#!/usr/bin/python3
# Multi-conn: writes spread over 4 connections, FLUSH on one, then every other
# connection reads all of them. Usage: multiconn_flush.py URI (nbd:// or nbds://)
import os
import sys
import nbd

uri = sys.argv[1]
handles = []
for _ in range(4):
    h = nbd.NBD()
    # nbds:// URIs name their credentials (tls-certificates=DIR, tls-psk-file=FILE).
    h.set_uri_allow_local_file(True)
    h.connect_uri(uri)
    if not h.can_multi_conn():
        sys.exit("server does not advertise multi-conn")
    handles.append(h)

rounds = 50
expected = {}
for r in range(rounds):
    for i, h in enumerate(handles):
        offset = (r * 4 + i) * 8192 + 512 * i
        data = os.urandom(4096)
        h.pwrite(data, offset)
        expected[offset] = data
    flusher = handles[r % 4]
    flusher.flush()
    for j, h in enumerate(handles):
        if j == r % 4:
            continue
        for offset, data in expected.items():
            if h.pread(len(data), offset) != data:
                sys.exit(f"round {r}: connection {j} does not see the write at {offset} after a flush on {r % 4}")
for h in handles:
    h.shutdown()
print("ok")
