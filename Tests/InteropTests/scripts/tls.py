#!/usr/bin/python3
# TLS with real clients: nbdinfo, nbdcopy, qemu-img and libnbd, over TCP and a Unix socket.
#
# Usage:
#   tls.py x509 SOCKET PORT CERTS   server: --tls require --tls-certificates CERTS/server --tls-verify-peer
#   tls.py psk SOCKET PORT KEYDIR   server: --tls on --tls-psk KEYDIR/keys.psk
# CERTS holds the directories tlscerts.sh made: client (good), anon (CA only, no client
# certificate), foreign (client certificate from another CA), revoked (on the CRL).
import os
import socket
import struct
import subprocess
import sys
import tempfile

import nbd

from checks import check, failures

mode, sock, port, base = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
size = 32 << 20

NBD_OPT_EXPORT_NAME, NBD_OPT_ABORT, NBD_OPT_LIST, NBD_OPT_STARTTLS, NBD_OPT_GO = 1, 2, 3, 5, 7
NBD_REP_ACK, NBD_REP_SERVER, NBD_REP_ERR_TLS_REQD = 1, 2, (1 << 31) | 5


def run(argv, timeout=120):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


if mode == "x509":
    good = f"tls-certificates={base}/client"
    tcp = f"nbds://localhost:{port}/disk?{good}"
    unix = f"nbds+unix:///disk?socket={sock}&{good}"
    qemu_object = f"tls-creds-x509,id=tls0,dir={base}/client,endpoint=client"
else:
    good = f"tls-psk-file={base}/keys.psk"
    tcp = f"nbds://alice@localhost:{port}/disk?{good}"
    unix = f"nbds+unix://alice@/disk?socket={sock}&{good}"
    qemu_object = f"tls-creds-psk,id=tls0,dir={base},username=alice,endpoint=client"

work = tempfile.mkdtemp()
source = os.path.join(work, "source")
with open(source, "wb") as f:
    f.write(os.urandom(size))

# nbdinfo over both transports says TLS is on.
for uri in (tcp, unix):
    r = run(["nbdinfo", uri])
    check(r.returncode == 0 and "with TLS" in r.stdout, f"nbdinfo {uri}: {r.stdout} {r.stderr}")

# nbdcopy in over TCP with 4 connections, back out over the Unix socket; same bytes.
r = run(["nbdcopy", "--connections=4", source, tcp])
check(r.returncode == 0, f"nbdcopy in over TLS: {r.stderr}")
back = os.path.join(work, "back")
r = run(["nbdcopy", unix, back])
check(r.returncode == 0, f"nbdcopy out over TLS: {r.stderr}")
if r.returncode == 0:
    with open(source, "rb") as a, open(back, "rb") as b:
        check(b.read(size) == a.read(), "data copied over TLS differs")

# qemu-img compare and convert through qemu's TLS credentials object.
image = f"driver=nbd,server.type=inet,server.host=localhost,server.port={port},export=disk,tls-creds=tls0"
raw = f"driver=raw,file.driver=file,file.filename={source}"
r = run(["qemu-img", "compare", "--object", qemu_object, "--image-opts", image, raw])
check(r.returncode == 0 and "identical" in r.stdout, f"qemu-img compare over TLS: {r.stdout} {r.stderr}")
first_mib = os.path.join(work, "first")
with open(first_mib, "wb") as f:
    f.write(os.urandom(1 << 20))
r = run(["qemu-img", "convert", "-n", "--object", qemu_object, "-f", "raw", first_mib, "--target-image-opts", image])
check(r.returncode == 0, f"qemu-img convert over TLS: {r.stderr}")
check(run(["nbdinfo", "--size", tcp]).stdout.strip() == str(64 << 20), "export size over TLS")

# Multi-conn over TLS: a FLUSH on one connection makes every write visible on the others.
r = run(["/usr/bin/python3", os.path.join(os.path.dirname(__file__), "multiconn_flush.py"), tcp])
check(r.returncode == 0, f"multi-conn flush over TLS: {r.stdout} {r.stderr}")


def connect(**options):
    """A libnbd handle with `options` set, connected to the TCP port; the error or None."""
    h = nbd.NBD()
    for name, value in options.items():
        getattr(h, "set_" + name)(value)
    try:
        h.connect_tcp("localhost", str(port))
        return h, None
    except nbd.Error as error:
        return None, error


if mode == "x509":
    # A client that cannot prove itself is refused: no certificate, or one from another CA.
    for label in ("anon", "foreign", "revoked"):
        h, error = connect(tls=nbd.TLS_REQUIRE, tls_certificates=f"{base}/{label}", export_name="disk")
        check(error is not None, f"a client with {label} credentials was let in")
else:
    # A wrong key, and an identity the server does not know, fail the handshake.
    wrong = os.path.join(work, "wrong.psk")
    with open(wrong, "w") as f:
        f.write("alice:" + os.urandom(32).hex() + "\n")
    for username, keys in (("alice", wrong), ("mallory", wrong)):
        h, error = connect(tls=nbd.TLS_REQUIRE, tls_psk_file=keys, tls_username=username, export_name="disk")
        check(error is not None, f"PSK {username} with a wrong key was let in")


def raw_handshake():
    """A plain TCP connection past the greeting, with fixed newstyle and no zeroes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    greeting = recv_exactly(s, 18)
    check(greeting[:8] == b"NBDMAGIC", "greeting")
    s.sendall(struct.pack(">I", 3))
    return s


def recv_exactly(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            return data
        data += chunk
    return data


def option(s, code, payload=b""):
    s.sendall(b"IHAVEOPT" + struct.pack(">II", code, len(payload)) + payload)


def option_reply(s):
    header = recv_exactly(s, 20)
    if len(header) < 20:
        return None, None
    _, opt, kind, length = struct.unpack(">QIII", header)
    return kind, recv_exactly(s, length)


def closed(s):
    """True when the server ends the connection (end of file or reset) within the timeout;
    what it sends first (a TLS alert) is skipped."""
    try:
        for _ in range(64):
            if s.recv(4096) == b"":
                return True
        return False
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


# A long-lived TLS connection that must keep working while others misbehave.
keeper, error = connect(tls=nbd.TLS_REQUIRE, export_name="disk",
                        **({"tls_certificates": f"{base}/client"} if mode == "x509" else
                           {"tls_psk_file": f"{base}/keys.psk", "tls_username": "alice"}))
check(error is None, f"TLS connection: {error}")

if mode == "x509":
    # FORCEDTLS: plain-text options get TLS_REQD and no export names; EXPORT_NAME is dropped.
    s = raw_handshake()
    option(s, NBD_OPT_LIST)
    kind, payload = option_reply(s)
    check(kind == NBD_REP_ERR_TLS_REQD, f"plain NBD_OPT_LIST got reply type {kind}")
    check(b"disk" not in (payload or b""), "the plain-text LIST reply named an export")
    option(s, NBD_OPT_GO, struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0))
    kind, payload = option_reply(s)
    check(kind == NBD_REP_ERR_TLS_REQD, f"plain NBD_OPT_GO got reply type {kind}")
    option(s, NBD_OPT_EXPORT_NAME, b"disk")
    check(closed(s), "plain NBD_OPT_EXPORT_NAME did not end the connection")
    s.close()
    # libnbd without TLS: the list and the export are refused.
    h, error = connect(tls=nbd.TLS_DISABLE, export_name="disk")
    check(error is not None, "a plain-text libnbd client reached the export")
    h = nbd.NBD()
    h.set_tls(nbd.TLS_DISABLE)
    h.set_opt_mode(True)
    h.connect_tcp("localhost", str(port))
    seen = []
    try:
        h.opt_list(lambda name, description: seen.append(name))
        check(False, "plain-text opt_list succeeded")
    except nbd.Error:
        pass
    check(seen == [], f"plain-text opt_list showed {seen}")
    h.opt_abort()
else:
    # TLS on (not required): a plain-text client still works, alongside TLS ones.
    h, error = connect(tls=nbd.TLS_DISABLE, export_name="disk")
    check(error is None and h.pread(4096, 0) is not None, f"plain-text client under --tls on: {error}")

# Bytes sent with STARTTLS, before its reply, are never read: the connection ends.
s = raw_handshake()
s.sendall(b"IHAVEOPT" + struct.pack(">II", NBD_OPT_STARTTLS, 0) + b"\x16\x03\x01garbage")
kind, _ = option_reply(s)
check(kind in (None, NBD_REP_ACK), f"STARTTLS with trailing bytes got {kind}")
check(closed(s), "bytes sent before the STARTTLS reply did not end the connection")
s.close()

# Garbage in the middle of the TLS handshake ends that connection only.
s = raw_handshake()
option(s, NBD_OPT_STARTTLS)
kind, _ = option_reply(s)
check(kind == NBD_REP_ACK, f"STARTTLS got reply type {kind}")
s.sendall(b"\x16\x03\x01\x00\x10" + os.urandom(16) + os.urandom(300))
check(closed(s), "garbage in the TLS handshake did not end the connection")
s.close()

check(keeper is not None and keeper.pread(4096, 0) is not None, "the other TLS connection stopped working")
if keeper is not None:
    data = os.urandom(65536)
    keeper.pwrite(data, 1 << 20)
    keeper.flush()
    check(keeper.pread(65536, 1 << 20) == data, "the other TLS connection's write")
    keeper.shutdown()

if failures:
    sys.exit("\n".join(failures))
print("ok")
