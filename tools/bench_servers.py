"""Starting and stopping the servers the benchmark scripts measure (imported by
bench-nbd.py and bench-copy-bound.py): always by the pid of the process they started."""

import os
import signal
import subprocess
import time


def wait_for_socket(path, proc):
    """Waits for `proc` to listen on `path`; a server that exits or takes over 30 s is
    stopped (by its pid) and reported."""
    deadline = time.time() + 30
    while not os.path.exists(path):
        if proc.poll() is not None or time.time() > deadline:
            stop(proc)
            raise RuntimeError(f"server did not start: {proc.args}")
        time.sleep(0.05)


def stop(proc):
    """SIGTERM by pid, then SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
