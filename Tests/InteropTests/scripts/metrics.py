#!/usr/bin/python3
# Metrics and space while served. Usage: metrics.py THINBD POOL SOCKET
#   The server runs with --metrics, --low-water 50, --autogrow 8M --autogrow-max 24M on a
#   16 MiB pool with volumes "disk" and "small". libnbd writes and reads; the scrape must
#   count them per export, and show the pool's space, commits and copy-on-write; filling
#   past the low-water mark grows the pool, and at the maximum sets the low-water gauge.
import json
import re
import subprocess
import sys
import time
import urllib.request
import nbd

thinbd, pool, sock = sys.argv[1:4]
failures = []


def check(ok, what):
    if not ok:
        failures.append(what)


def uri(export):
    return f"nbd+unix:///{export}?socket={sock}"


control = subprocess.run(["/usr/bin/python3", "-c", f"""
import json, socket
s = socket.socket(socket.AF_UNIX); s.connect({pool + '.control'!r})
s.sendall(b'{{"command":"hello"}}\\n'); print(s.makefile().readline())
"""], capture_output=True, text=True)
url = json.loads(control.stdout)["result"]["metrics"]
check(url and url.endswith("/metrics"), f"hello has no metrics URL: {control.stdout}")


def scrape():
    with urllib.request.urlopen(url, timeout=10) as response:
        check(response.headers.get("Content-Type", "").startswith("text/plain"), "metrics content type")
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values, text


h = nbd.NBD()
h.connect_uri(uri("disk"))
h.pwrite(b"\x01" * (1 << 20), 0)
h.pread(1 << 20, 0)
h.flush()
subprocess.run([thinbd, "snapshot", pool, "disk@s"], check=True, capture_output=True)
h.pwrite(b"\x02" * 65536, 0)  # a copy-on-write of one block
h.flush()
values, text = scrape()
check(values.get('thinbd_bytes_total{export="disk",op="write"}', 0) >= (1 << 20) + 65536, "write bytes not counted")
check(values.get('thinbd_bytes_total{export="disk",op="read"}', 0) >= 1 << 20, "read bytes not counted")
check(values.get('thinbd_requests_total{export="disk",op="flush"}', 0) >= 2, "flushes not counted")
check(values.get('thinbd_connections{export="disk"}') == 1.0, "connection gauge")
check(values.get("thinbd_pool_copy_on_write_blocks_total", 0) >= 1, "copy-on-write not counted")
check(values.get("thinbd_pool_commits_total", 0) >= 2, "commits not counted")
check(values.get("thinbd_pool_used_bytes", 0) >= (1 << 20) + 65536, "pool used bytes")
check(re.search(r'thinbd_request_duration_seconds_bucket\{export="disk",op="write",le="[^"]+"\} [1-9]', text) is not None,
      "no latency histogram for writes")
h.shutdown()

small = nbd.NBD()
small.connect_uri(uri("small"))
# 50% of 16 MiB is the mark: 10 MiB crosses it; autogrow takes the pool to 24 MiB.
for i in range(10):
    small.pwrite(bytes([i + 1]) * (1 << 20), i << 20)
small.flush()
deadline = time.time() + 10
while time.time() < deadline:
    values, _ = scrape()
    if values.get("thinbd_pool_size_bytes") == 24 << 20 and values.get("thinbd_pool_low_water") == 0.0:
        break
    time.sleep(0.2)
check(values.get("thinbd_pool_size_bytes") == 24 << 20, f"autogrow did not reach 24 MiB: {values.get('thinbd_pool_size_bytes')}")
check(values.get("thinbd_pool_autogrow_total", 0) >= 1, "autogrow not counted")
# Past 50% of the maximum: nothing left to grow, so the low-water gauge goes up.
for i in range(10, 14):
    small.pwrite(bytes([i + 1]) * (1 << 20), i << 20)
small.flush()
deadline = time.time() + 10
while time.time() < deadline:
    values, _ = scrape()
    if values.get("thinbd_pool_low_water") == 1.0:
        break
    time.sleep(0.2)
check(values.get("thinbd_pool_low_water") == 1.0, "low-water gauge not set at 14 MiB of 24 MiB (> 50%)")
# Filling it up: writes fail with ENOSPC, and the errors are counted.
try:
    for i in range(14, 32):
        small.pwrite(b"\xee" * (1 << 20), i << 20)
    failures.append("a full pool took every write")
except nbd.Error as e:
    check(e.errno == 28 or "No space" in str(e), f"full pool error: {e}")
values, _ = scrape()
check(values.get('thinbd_request_errors_total{export="small",op="write"}', 0) >= 1, "write errors not counted")
small.shutdown()

try:
    urllib.request.urlopen(url.replace("/metrics", "/nothing"), timeout=10)
    failures.append("an unknown path did not 404")
except urllib.error.HTTPError as e:
    check(e.code == 404, f"unknown path: {e.code}")

for f in failures:
    print("FAIL:", f)
sys.exit(1 if failures else 0)
