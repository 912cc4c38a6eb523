"""Calls with a time limit: the call runs on a daemon worker thread and the
caller waits at most so long for it.

Python cannot stop a running function, so a call past its limit is
abandoned: it runs to its end on its worker, and its result is dropped. The
workers are daemon threads, so an abandoned call that never ends does not
hold up the interpreter's exit. Used to keep a slow policy hook inside the
socket's timeout (``dmm.policy.ask``).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

__all__ = ["Expired", "call"]

#: Workers at most; calls beyond wait in the queue (and count their wait).
MAX_WORKERS = 8

_jobs: "queue.SimpleQueue[_Job]" = queue.SimpleQueue()
_lock = threading.Lock()
_workers = 0
_idle = 0


class Expired(Exception):
    """The call did not finish within its limit (it goes on running)."""


class _Job:
    __slots__ = ("fn", "args", "done", "result", "error")

    def __init__(self, fn: Callable[..., Any], args: tuple) -> None:
        self.fn, self.args = fn, args
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


def call(limit: float, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` if it returns within ``limit`` seconds (what it raises
    is raised here), else :class:`Expired`."""
    job = _Job(fn, args)
    _submit(job)
    if not job.done.wait(max(limit, 0.0)):
        raise Expired(f"not done after {limit:.3g} s")
    if job.error is not None:
        raise job.error
    return job.result


def _submit(job: _Job) -> None:
    global _workers, _idle
    with _lock:
        # An idle worker is taken (so two callers never count on one), else
        # a new one starts while there is room; else the job waits its turn.
        spawn = False
        if _idle:
            _idle -= 1
        elif _workers < MAX_WORKERS:
            _workers += 1
            spawn = True
    _jobs.put(job)
    if spawn:
        threading.Thread(target=_work, name="dmm-deadline", daemon=True).start()


def _work() -> None:
    global _idle
    while True:
        job = _jobs.get()
        try:
            job.result = job.fn(*job.args)
        except BaseException as exc:  # handed to the caller, who decides
            job.error = exc
        job.done.set()
        with _lock:
            _idle += 1
