"""Leases: how many writers (processes, nodes, array tasks) share one study folder safely.

A writer claims a run before it touches the run's folder, by creating a lease file exclusively
(`os.link` of a complete temporary file: atomic on local file systems and on NFS). The lease
holds its owner (host, pid, a random token, start time); a heartbeat thread renews it (touches
its mtime) every `heartbeat_s` seconds while the run goes on.

A lease is stale when it has not been renewed for `stale_after_s` seconds, or when its owner
is a process on this host that no longer exists. A stale lease is taken over by creating the
next *generation* of the lease file, `<run_id>.<g+1>.lease`, exclusively: of several writers
that find the same stale lease, exactly one wins. The generations of one run form a contiguous
chain from 0 until the run's lease is released; the current lease is the last of the chain.
An owner that was paused past its lease (SIGSTOP, a frozen node) finds on its next write that
the chain moved on (`Lease.check`), and stops without writing.

Everything lives in `<out>/leases/`; the run folders keep the layout store.py describes.
Cost: a few stat calls per claim, one utime per heartbeat.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from normlab.runs.spec import RunSpec
from normlab.runs.store import RunStore
from normlab.utils.config import ConfigError

LEASE_DIR = "leases"
HEARTBEAT_ENV = "NORMLAB_LEASE_HEARTBEAT_S"
STALE_ENV = "NORMLAB_LEASE_STALE_S"
DEFAULT_HEARTBEAT_S = 10.0
DEFAULT_STALE_AFTER_S = 60.0


class LeaseLostError(RuntimeError):
    """This writer's lease was taken over: it must stop writing to the run folder."""


@dataclass(frozen=True)
class Owner:
    """Who holds a lease."""

    host: str
    pid: int
    token: str
    started: float

    @classmethod
    def me(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), secrets.token_hex(8), time.time())

    def describe(self) -> str:
        return f"{self.host} pid {self.pid}"

    def is_dead_here(self) -> bool:
        """True when the owner is a process on this host that no longer exists."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def lease_timing() -> tuple[float, float]:
    """(heartbeat_s, stale_after_s) from the environment, validated."""
    values = []
    for name, default in ((HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S), (STALE_ENV, DEFAULT_STALE_AFTER_S)):
        text = os.environ.get(name, "")
        try:
            value = float(text) if text else default
        except ValueError:
            value = -1.0
        if not value > 0:
            raise ConfigError(f"The '{name}' setting must be a float in (0, inf); got {text!r}.")
        values.append(value)
    heartbeat_s, stale_after_s = values
    if stale_after_s <= 2 * heartbeat_s:
        raise ConfigError(f"The '{STALE_ENV}' setting must be more than twice {HEARTBEAT_ENV} "
                          f"({heartbeat_s}); got {stale_after_s}.")
    return heartbeat_s, stale_after_s


class Lease:
    """A held claim on one run; renewed by a daemon thread until `release()`."""

    def __init__(self, path: Path, owner: Owner, heartbeat_s: float) -> None:
        self.path, self.owner, self.heartbeat_s = path, owner, heartbeat_s
        _HELD.add(self)
        self._lost = threading.Event()
        self._released = threading.Event()
        self._verified_at = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name=f"lease {path.name}",
                                        daemon=True)
        self._thread.start()

    def _next_path(self) -> Path:
        run_id, generation, suffix = self.path.name.rsplit(".", 2)
        return self.path.with_name(f"{run_id}.{int(generation) + 1}.{suffix}")

    def renew(self) -> bool:
        """Touch the lease if it is still ours; False (and lost for good) when it is not."""
        if self._lost.is_set():
            return False
        if _read_owner(self.path) != self.owner or self._next_path().exists():
            self._lost.set()
            return False
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path)
        self._verified_at = time.monotonic()
        return True

    def check(self) -> None:
        """Raise LeaseLostError unless the lease is still ours (verified at least every beat)."""
        if self._lost.is_set() or (time.monotonic() - self._verified_at > self.heartbeat_s
                                   and not self.renew()):
            raise LeaseLostError(f"the lease {self.path} was taken over by another writer")

    @property
    def held(self) -> bool:
        try:
            self.check()
        except LeaseLostError:
            return False
        return True

    def release(self) -> None:
        """Stop renewing and remove the lease chain if it is still ours."""
        self._released.set()
        _HELD.discard(self)
        if self._thread is not threading.current_thread():
            self._thread.join()
        if not self.renew():
            return
        run_id, generation, _ = self.path.name.rsplit(".", 2)
        for g in range(int(generation), -1, -1):
            with contextlib.suppress(FileNotFoundError):
                self.path.with_name(f"{run_id}.{g}.lease").unlink()

    def _beat(self) -> None:
        while not self._released.wait(self.heartbeat_s):
            if not self.renew():
                return


_HELD: set[Lease] = set()


def release_held_leases() -> None:
    """Release every lease this process holds (a SLURM task about to be requeued)."""
    for lease in list(_HELD):
        lease.release()


def _read_owner(path: Path) -> Owner | None:
    try:
        return Owner(**json.loads(path.read_text(encoding="utf-8")))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None


def _is_stale(path: Path, owner: Owner | None, stale_after_s: float) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False  # released meanwhile: the caller looks again
    return owner is None or age > stale_after_s or owner.is_dead_here()


def try_claim(root: str | Path, run_id: str) -> Lease | Owner | None:
    """Claim `run_id` in the study folder `root`.

    Returns the Lease when claimed, the live Owner when another writer holds it, or None when
    the race could not be settled in a few tries (call again later).
    """
    heartbeat_s, stale_after_s = lease_timing()
    folder = Path(root) / LEASE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    me = Owner.me()
    for _ in range(5):
        generation = 0
        while (folder / f"{run_id}.{generation}.lease").exists():
            generation += 1
        if generation:
            current = folder / f"{run_id}.{generation - 1}.lease"
            owner = _read_owner(current)
            if not _is_stale(current, owner, stale_after_s):
                if owner is not None:
                    return owner
                continue
        target = folder / f"{run_id}.{generation}.lease"
        if not _create_exclusively(target, json.dumps(asdict(me))):
            continue
        if generation and not (folder / f"{run_id}.{generation - 1}.lease").exists():
            target.unlink()  # the chain was released under us: start again from generation 0
            continue
        return Lease(target, me, heartbeat_s)
    return None


def _create_exclusively(target: Path, text: str) -> bool:
    """Create `target` holding `text`, complete at once; False if it already exists."""
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def current_owner(root: str | Path, run_id: str) -> Owner | None:
    """The owner of `run_id`'s live lease, or None when nobody holds it (or it is stale)."""
    _, stale_after_s = lease_timing()
    folder = Path(root) / LEASE_DIR
    generation = 0
    while (folder / f"{run_id}.{generation}.lease").exists():
        generation += 1
    if not generation:
        return None
    current = folder / f"{run_id}.{generation - 1}.lease"
    owner = _read_owner(current)
    return None if _is_stale(current, owner, stale_after_s) else owner


@contextlib.contextmanager
def claimed(store: RunStore, spec: RunSpec) -> Iterator[Lease | None]:
    """The lease on `spec`'s run, or None when another writer holds it or it is already done.

    The run is checked for being done *after* it is claimed, so a run finished by another
    writer a moment ago is never started again.
    """
    lease = try_claim(store.root, spec.run_id)
    if not isinstance(lease, Lease):
        yield None
        return
    try:
        yield None if store.is_done(spec) else lease
    finally:
        lease.release()
