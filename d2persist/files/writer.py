"""A background writer with at most one write in flight, whose errors are never lost."""

import contextlib
import logging
import os
import threading
from typing import Any, Callable, Optional

__all__ = ["BackgroundWriter"]

logger = logging.getLogger(__name__)


def _lowest_priority():
    """Let the calling thread run only on CPU time that no other thread wants (Linux)."""
    tid = threading.get_native_id()
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, tid, 19)


class BackgroundWriter:
    """
    Runs one write job at a time on a background thread (or inline when ``enabled`` is False).
    The thread runs at the lowest CPU priority, so training threads come first.

    :meth:`submit` first waits for the job in flight, so at most one snapshot waits in memory.
    An exception raised by a job is re-raised, on the caller's thread, by the next
    :meth:`submit`, :meth:`wait` or :meth:`check`.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def _run(self, fn, args):
        try:
            _lowest_priority()
            fn(*args)
        except BaseException as e:  # noqa: B036 — handed to the training thread
            self._error = e

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Wait for the job in flight, then run ``fn(*args)`` (in the background if enabled)."""
        self.wait()
        if not self.enabled:
            fn(*args)
            return
        self._thread = threading.Thread(
            target=self._run, args=(fn, args), name="d2persist-writer", daemon=False
        )
        self._thread.start()

    def wait(self) -> None:
        """Block until no job is in flight; re-raise its error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()

    def check(self) -> None:
        """Re-raise the error of a finished job, if any, without waiting."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
