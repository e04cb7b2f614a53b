#!/usr/bin/python3
# Malformed and hostile NBD traffic, spoken with raw sockets. Each case may only close
# its own connection; afterwards the server must still serve everyone.
# Usage: abuse.py SOCKET_PATH EXPORT
import os
import random
import socket
import struct
import sys
import threading
import nbd

path, export = sys.argv[1], sys.argv[2].encode()
NBDMAGIC, IHAVEOPT, REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
REQUEST, SIMPLE, STRUCTURED = 0x25609513, 0x67446698, 0x668E33EF
ERR_UNSUP, ERR_TOO_BIG = (1 << 31) + 1, (1 << 31) + 9
failures = []


def recv_exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def connect(flags=3):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(path)
    magic, opt, _ = struct.unpack(">QQH", recv_exact(s, 18))
    assert magic == NBDMAGIC and opt == IHAVEOPT
    if flags is not None:
        s.sendall(struct.pack(">I", flags))
    return s


def option(s, opt, payload=b"", length=None):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(payload) if length is None else length) + payload)


def reply(s):
    magic, opt, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
    assert magic == REPLY_MAGIC, hex(magic)
    return opt, rtype, recv_exact(s, length)


def closed_by_server(s):
    try:
        while True:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def go(s):
    option(s, 7, struct.pack(">I", len(export)) + export + struct.pack(">H", 0))
    while True:
        _, rtype, _ = reply(s)
        if rtype == 1:
            return
        if rtype & (1 << 31):
            raise RuntimeError(f"GO failed with {rtype:#x}")


def request(s, command, offset, length, cookie, flags=0, payload=b""):
    s.sendall(struct.pack(">IHHQQI", REQUEST, flags, command, cookie, offset, length) + payload)


def simple_reply(s):
    magic, error, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == SIMPLE, hex(magic)
    return error, cookie


def case(name, body):
    try:
        body()
    except Exception as e:  # noqa: BLE001
        failures.append(f"{name}: {type(e).__name__}: {e}")


def garbage():
    s = connect(flags=None)
    s.sendall(os.urandom(4096))
    if not closed_by_server(s):
        raise AssertionError("server kept a connection that sent garbage")


def huge_option():
    s = connect()
    option(s, 7, length=0xFFFFFFF0)
    if not closed_by_server(s):
        raise AssertionError("server kept waiting for a 4 GiB option")


def oversized_option_then_list():
    s = connect()
    option(s, 3, os.urandom(100_000))
    _, rtype, _ = reply(s)
    assert rtype == ERR_TOO_BIG, f"expected NBD_REP_ERR_TOO_BIG, got {rtype:#x}"
    option(s, 3)
    names = []
    while True:
        _, rtype, data = reply(s)
        if rtype == 1:
            break
        assert rtype == 2, f"LIST reply {rtype:#x}"
        (n,) = struct.unpack(">I", data[:4])
        names.append(data[4:4 + n])
    assert export in names, names
    option(s, 2)
    reply(s)


def unknown_option():
    s = connect()
    option(s, 99, b"hello")
    _, rtype, _ = reply(s)
    assert rtype == ERR_UNSUP, f"expected NBD_REP_ERR_UNSUP, got {rtype:#x}"
    option(s, 5)  # STARTTLS: not supported
    _, rtype, _ = reply(s)
    assert rtype & (1 << 31), "STARTTLS should be refused"
    go(s)
    request(s, 0, 0, 512, 1)
    error, cookie = simple_reply(s)
    assert error == 0 and cookie == 1
    recv_exact(s, 512)
    request(s, 2, 0, 0, 2)


def bad_client_flags():
    s = connect(flags=0x80)
    if not closed_by_server(s):
        raise AssertionError("unknown client flags accepted")


def bad_option_magic():
    s = connect()
    s.sendall(struct.pack(">QII", 0x1122334455667788, 7, 0))
    if not closed_by_server(s):
        raise AssertionError("bad option magic accepted")


def bad_request_magic():
    s = connect()
    go(s)
    s.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512))
    if not closed_by_server(s):
        raise AssertionError("bad request magic accepted")


def oversized_write_keeps_sync():
    s = connect()
    go(s)
    big = 40 << 20
    request(s, 1, 0, big, 7)
    chunk = bytes(1 << 20)
    for _ in range(big >> 20):
        s.sendall(chunk)
    error, cookie = simple_reply(s)
    assert cookie == 7 and error == 22, f"oversized write: error {error}"
    request(s, 1, 4096, 512, 8, payload=b"\x42" * 512)
    assert simple_reply(s) == (0, 8)
    request(s, 0, 4096, 512, 9)
    assert simple_reply(s) == (0, 9)
    assert recv_exact(s, 512) == b"\x42" * 512, "stream lost sync after an oversized write"
    request(s, 99, 0, 0, 10)
    assert simple_reply(s) == (22, 10), "unknown command should be EINVAL"
    request(s, 0, 1 << 62, 512, 11)
    assert simple_reply(s) == (22, 11), "out-of-range read should be EINVAL"
    request(s, 0, (1 << 64) - 256, 512, 12)
    assert simple_reply(s) == (22, 12), "offset overflow should be EINVAL"
    request(s, 2, 0, 0, 13)
    assert closed_by_server(s)


def fragmented_large_writes():
    """Large WRITEs whose payloads arrive in odd pieces, pipelined behind and ahead of
    other requests: the server assembles them and stays in sync."""
    s = connect()
    go(s)
    rng = random.Random(5)
    first = bytes(rng.getrandbits(8) for _ in range(1 << 20))
    second = bytes(rng.getrandbits(8) for _ in range(65536 + 512))
    stream = (struct.pack(">IHHQQI", REQUEST, 0, 1, 21, 1 << 20, len(first)) + first
              + struct.pack(">IHHQQI", REQUEST, 0, 1, 22, 3 << 20, len(second)) + second
              # Unordered with the writes (NBD does not order requests): a range they miss.
              + struct.pack(">IHHQQI", REQUEST, 0, 0, 23, 8 << 20, 8192))
    position = 0
    while position < len(stream):
        step = rng.choice([1, 7, 28, 29, 4095, 65536, 100_000])
        s.sendall(stream[position:position + step])
        position += step
    replies = {}
    for _ in range(3):
        error, cookie = simple_reply(s)
        replies[cookie] = error
        if cookie == 23 and error == 0:
            data = recv_exact(s, 8192)
            assert data == bytes(8192), "a read pipelined behind fragmented writes saw other bytes"
    assert replies == {21: 0, 22: 0, 23: 0}, f"replies {replies}"
    request(s, 0, 1 << 20, 1 << 20, 24)
    assert simple_reply(s) == (0, 24)
    assert recv_exact(s, 1 << 20) == first, "1 MiB write assembled from fragments reads back differently"
    request(s, 0, 3 << 20, len(second), 26)
    assert simple_reply(s) == (0, 26)
    assert recv_exact(s, len(second)) == second, "64 KiB + 512 write assembled from fragments reads back differently"
    request(s, 2, 0, 0, 25)
    assert closed_by_server(s)


def abandoned_large_write():
    """A client that dies halfway through a large payload: nothing is written."""
    s = connect()
    go(s)
    request(s, 1, 5 << 20, 1 << 20, 31)
    s.sendall(b"\x77" * (300_000))
    s.close()
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///{export.decode()}?socket={path}")
    got = h.pread(300_000, 5 << 20)
    h.shutdown()
    assert got != b"\x77" * 300_000, "a WRITE whose payload never finished was applied"


def half_request():
    s = connect()
    go(s)
    s.sendall(struct.pack(">IHH", REQUEST, 0, 1))
    s.close()


def parallel_garbage():
    threads = [threading.Thread(target=garbage) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


for name, body in [
    ("garbage", garbage), ("huge option", huge_option), ("oversized option", oversized_option_then_list),
    ("unknown option", unknown_option), ("bad client flags", bad_client_flags),
    ("bad option magic", bad_option_magic), ("bad request magic", bad_request_magic),
    ("oversized write", oversized_write_keeps_sync), ("fragmented large writes", fragmented_large_writes),
    ("abandoned large write", abandoned_large_write), ("half request", half_request),
    ("parallel garbage", parallel_garbage),
]:
    case(name, body)

# Everyone else is still served.
h = nbd.NBD()
h.connect_uri(f"nbd+unix:///{export.decode()}?socket={path}")
h.pwrite(b"\x99" * 4096, 0)
if h.pread(4096, 0) != b"\x99" * 4096:
    failures.append("server no longer serves correctly")
h.shutdown()
if failures:
    print(*failures, sep="\n")
    sys.exit(1)
print("ok")
