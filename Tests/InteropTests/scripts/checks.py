"""Helpers shared by the interop scripts: collected failures, the control socket, and the
arguments a script's own `thinbd serve` takes."""
import errno
import json
import os
import socket

# tools/test.sh's second interop pass (THINBD_TEST_TRANSMISSION=nio) reaches the servers
# scripts start themselves too: add these to their `thinbd serve` arguments.
SERVE_TRANSMISSION = (["--transmission", os.environ["THINBD_TEST_TRANSMISSION"]]
                      if os.environ.get("THINBD_TEST_TRANSMISSION") else [])

failures = []


def check(ok, what):
    """Records `what` as a failure unless `ok`."""
    if not ok:
        failures.append(what)


def control(pool, request):
    """One request on the pool's control socket (docs/control-api.md); the reply."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(pool + ".control")
        s.sendall((json.dumps(request) + "\n").encode())
        return json.loads(s.makefile().readline())


def has_errno(error, code):
    """libnbd reports errno as the symbolic name ("EIO") in some versions, a number in others."""
    return error.errno in (code, errno.errorcode.get(code))
