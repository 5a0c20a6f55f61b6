"""Process-pool hygiene: workers die with their parent, and Ctrl-C stops a pool within seconds.

`die_with_parent` runs in each worker as the pool's initializer. On Linux it asks the kernel
to SIGKILL the worker when its parent dies (prctl PR_SET_PDEATHSIG); everywhere a daemon
thread also checks once a second that the parent is still the same process and exits if not.
`stopped_on_error` (through `stop_pool`) cancels the runs not yet started and terminates the
workers, instead of waiting for every submitted run as `ProcessPoolExecutor.__exit__` does.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Make this process exit when the process `parent_pid` dies (call it in the child)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent watchdog",
                     daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


@contextlib.contextmanager
def stopped_on_error(pool: futures.ProcessPoolExecutor) -> Iterator[None]:
    """Stop `pool` at once (`stop_pool`) when the block raises, Ctrl-C included."""
    try:
        yield
    except BaseException:
        stop_pool(pool)
        raise


def stop_pool(pool: futures.ProcessPoolExecutor, grace_s: float = 2.0) -> None:
    """Cancel the pool's pending runs and terminate its workers (SIGTERM, then SIGKILL)."""
    # The worker processes are only reachable through this private attribute.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
