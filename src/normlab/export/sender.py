"""`Sender`: one background thread per process and tracking tool that does the tool's writes in
order, so that a run never waits for the tool.

A run's stream queues *jobs* (callables) and returns at once. The thread runs them one at a
time, in the order queued. A job that fails because the tool does not answer (an error
`unreachable(error)` says is one) stays at the head of the queue and is tried again after 1, 2,
4, ... 30 s: nothing queued is lost while the process lives. The first such failure is said
once on stderr, and so is the tool answering again. A job failing for any other reason is
dropped and said once per kind of error (the run's copy in the tool is then incomplete; the
study's closing export writes it whole).

At process exit (the interpreter's, or a multiprocessing worker's) the queue is drained for
at most `DRAIN_S` seconds, and no longer once the tool has not answered for `DOWN_GRACE_S`;
what is left unsent is counted on stderr. The run folders keep everything: `normlab export`
sends it again.
"""

from __future__ import annotations

import atexit
import collections
import multiprocessing.util
import sys
import threading
import time
from collections.abc import Callable

DRAIN_S = 30.0  # most seconds a process spends at exit sending what is still queued
DOWN_GRACE_S = 10.0  # a tool not answering for longer is not waited for
_MAX_WAIT_S = 30.0

Job = Callable[[], None]


class Sender:
    """Runs the jobs `put` to it, in order, in a daemon thread; see the module docstring."""

    def __init__(self, what: str, unreachable: Callable[[Exception], bool],
                 redo: str) -> None:
        self.what = what  # "the MLflow server at http://..." in messages
        self.unreachable = unreachable
        self.redo = redo  # the command that sends it all again, for messages
        self._queue: collections.deque[Job] = collections.deque()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._down_since: float | None = None
        self._said: set[str] = set()
        self._exited = False

    def put(self, job: Job) -> None:
        """Queue `job`; returns at once."""
        with self._changed:
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=f"normlab sender ({self.what})")
                self._thread.start()
            self._changed.notify_all()

    def cancel(self) -> int:
        """Drop every queued job (one being tried may still finish); the number dropped."""
        with self._changed:
            dropped = len(self._queue)
            self._queue.clear()
            self._changed.notify_all()
            return dropped

    @property
    def down(self) -> bool:
        """Whether the tool has not answered for more than DOWN_GRACE_S seconds."""
        return (self._down_since is not None
                and time.monotonic() - self._down_since > DOWN_GRACE_S)

    def drain(self, timeout_s: float = DRAIN_S) -> int:
        """Wait until every queued job ran, for at most `timeout_s` seconds, and no longer once
        the tool has not answered for DOWN_GRACE_S seconds; the number of jobs left."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._queue and not self.down and time.monotonic() < deadline:
                self._changed.wait(min(1.0, max(0.0, deadline - time.monotonic())))
            return len(self._queue)

    def _run(self) -> None:
        wait_s = 1.0
        while True:
            with self._changed:
                while not self._queue:
                    self._changed.wait()
                job = self._queue[0]
            try:
                job()
            except Exception as err:  # a tool's error must never reach a run
                if self.unreachable(err):
                    self.went_down(err)
                    self._pause(job, wait_s)
                    wait_s = min(2 * wait_s, _MAX_WAIT_S)
                    continue
                self._say_once(type(err).__name__, f"normlab: a write to {self.what} failed "
                               f"({type(err).__name__}: {err}); the runs go on and their "
                               f"folders keep everything ({self.redo} writes it whole).")
            wait_s = 1.0
            with self._changed:
                if self._queue and self._queue[0] is job:  # not cancelled meanwhile
                    self._queue.popleft()
                if self._down_since is not None:
                    self._say_once("answers again", f"normlab: {self.what} answers again "
                                   f"after {time.monotonic() - self._down_since:.0f} s; "
                                   "sending what was kept.")
                    self._down_since = None
                self._changed.notify_all()

    def _pause(self, job: Job, seconds: float) -> None:
        """Wait `seconds` before trying `job` again, or less if it is cancelled meanwhile."""
        with self._changed:
            self._changed.wait_for(lambda: not self._queue or self._queue[0] is not job,
                                   timeout=seconds)

    def went_down(self, err: BaseException) -> None:
        """Note (and say once) that the tool does not answer; the next job that succeeds says
        it answers again."""
        with self._changed:
            if self._down_since is None:
                self._down_since = time.monotonic()
                self._changed.notify_all()
        self._say_once("unreachable", f"normlab: {self.what} does not answer ({err}); the "
                       "runs go on, and what they log is kept and sent when it answers.")

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            print(message, file=sys.stderr, flush=True)

    def at_exit(self) -> None:
        """Drain (see `drain`) and say how much was left unsent (once: atexit and the
        multiprocessing finalizer may both call it)."""
        if self._exited:
            return
        self._exited = True
        left = self.drain()
        if left:
            print(f"normlab: {left} write(s) to {self.what} not sent as this process ends "
                  f"({'it does not answer' if self.down else 'out of time'}); the run "
                  f"folders keep everything: {self.redo} sends it.", file=sys.stderr,
                  flush=True)


_SENDERS: dict[str, Sender] = {}
_SENDERS_LOCK = threading.Lock()


def sender_for(key: str, make: Callable[[], Sender]) -> Sender:
    """This process's sender for `key` (a tool and its address), made by `make` the first time
    and drained when the process ends."""
    with _SENDERS_LOCK:
        sender = _SENDERS.get(key)
        if sender is None:
            sender = _SENDERS[key] = make()
            atexit.register(sender.at_exit)
            # a multiprocessing worker ends through os._exit, after its finalizers only
            multiprocessing.util.Finalize(sender, sender.at_exit, exitpriority=10)
        return sender
