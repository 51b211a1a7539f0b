"""
One process writes a run folder: an OS lock (``fcntl.lockf``) on ``.d2persist.lock``, with a
record of who holds it, released by the OS when the holder dies.
"""

import contextlib
import errno
import json
import logging
import os
from typing import Any, Dict, Optional, Tuple

from ..errors import ArtifactError, RunFolderBusyError
from ..layout import LOCK_NAME
from .atomic import _file_mode

__all__ = [
    "lock_run_folder",
    "unlock_run_folder",
    "read_lock_holder",
    "note_run_started",
    "restarted_run_started",
]

logger = logging.getLogger(__name__)


# -- the run lock ---------------------------------------------------------------------------------

# realpath of a run folder -> (descriptor of its locked file, its record), here
_HELD: Dict[str, Tuple[int, Dict[str, Any]]] = {}
#: errnos of a file system without flock (Lustre without -o flock, some FUSE mounts)
_NO_LOCKS = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL}


def _close_held_in_child():
    # a forked child (a DataLoader worker) shares the lock's open file description: it must
    # not keep the lock alive after this process dies. Closing drops only the child's reference.
    for fd, _ in _HELD.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


def read_lock_holder(folder: str) -> Optional[Dict[str, Any]]:
    """
    Who last took the run lock of ``folder`` (``{"host", "pid", "since"}``, and ``"started"``,
    ``"ppid"`` once that run got past its start-up checks), or None. Takes no lock: the record
    of a process that died stays in the file until the next run takes it.
    """
    try:
        fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read_record(fd)
    finally:
        os.close(fd)


def _write_record(fd, record):
    """
    Write ``record`` over the one in the lock file open as ``fd``, in place (the lock belongs
    to this inode), so that a process killed at any moment leaves one whole record, the old or
    the new: one write, padded to the old one's length (JSON ignores the blanks), then cut.
    """
    data = (json.dumps(record) + "\n").encode("utf-8")
    os.pwrite(fd, data.ljust(os.fstat(fd).st_size), 0)
    os.ftruncate(fd, len(data))
    os.fsync(fd)


def lock_run_folder(folder: str) -> bool:
    """
    Take the run lock of ``folder`` for this process, or fail at once if another process holds
    it. The lock is the kernel's (``flock`` on ``folder/.d2persist.lock``): it lasts while this
    process lives and is released when it exits or dies, SIGKILL included, so a crashed run
    never blocks its own resume (forked children do not inherit it). Taking it again in the
    process that holds it does nothing. On a file system without ``flock`` it warns once and
    goes on without a lock.

    Args:
        folder (str): the run folder; created if missing.

    Returns:
        bool: whether this call took it (False: already held by this process, or no locks).

    Raises:
        RunFolderBusyError: another process holds it; the sentence names host, pid and since when.
        ArtifactError: the folder or its lock file cannot be created (permissions, read-only).
    """
    import fcntl
    import socket
    import time

    key = os.path.realpath(folder)
    if key in _HELD:
        return False
    path = os.path.join(folder, LOCK_NAME)
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _file_mode())
    except OSError as e:
        raise ArtifactError(f"Cannot create {path}: {os.strerror(e.errno) if e.errno else e}.") \
            from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = read_lock_holder(folder) or {}
        raise RunFolderBusyError(
            f"{folder} is being written by another training run (host {holder.get('host', '?')}, "
            f"pid {holder.get('pid', '?')}, since {holder.get('since', '?')}); one process writes "
            "a run folder: wait for it to end, stop it, or choose another OUTPUT_DIR."
        ) from None
    except OSError as e:
        os.close(fd)
        assert e.errno is not None  # the OSError of a failed system call carries its errno
        if e.errno not in _NO_LOCKS:
            raise ArtifactError(f"Cannot lock {path}: {os.strerror(e.errno)}.") from None
        logger.warning("The file system of %s has no flock (%s): a second training into this "
                       "folder will not be kept out.", folder, os.strerror(e.errno))
        return False
    record: Dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(),
                              "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    # a run of this launcher got past its start-up checks: still so, if this one dies starting
    # (the record before read through this descriptor: on NFS, closing another one of the
    # file would release the lock)
    try:
        if _of_this_launcher_and_started(_read_record(fd)):
            record.update(started=True, ppid=os.getppid())
        _write_record(fd, record)
    except OSError as e:  # (a full disk): the lock given back, not kept by a lost descriptor
        os.close(fd)
        raise ArtifactError(f"Cannot write {path}: {os.strerror(e.errno) if e.errno else e}.") \
            from None
    _HELD[key] = (fd, record)
    return True


def note_run_started(folder: str) -> None:
    """
    Record in the run lock of ``folder`` (held by this process) that its run got past the
    start-up checks and trains, with this process's parent (its launcher): a worker that the
    same launcher restarts may then resume it (see :func:`restarted_run_started`).
    """
    # never opens the file again: on NFS (flock emulated by POSIX locks) closing any other
    # descriptor of it would release the lock
    held = _HELD.get(os.path.realpath(folder))
    if held is not None:
        held[1].update(started=True, ppid=os.getppid())
        _write_record(*held)


def restarted_run_started(folder: str) -> bool:
    """
    Whether the last holder of ``folder``'s run lock was started by this process's launcher
    (same host, same parent process) and got past its start-up checks: what a worker that
    torchrun restarted asks before it resumes by itself.
    """
    return _of_this_launcher_and_started(read_lock_holder(folder))


def _of_this_launcher_and_started(holder: Optional[Dict[str, Any]]) -> bool:
    import socket

    holder = holder or {}
    return bool(holder.get("started")) and holder.get("host") == socket.gethostname() and \
        holder.get("ppid") == os.getppid()


def _read_record(fd: int) -> Optional[Dict[str, Any]]:
    """The record in the lock file open as ``fd`` (None: none, or not one)."""
    try:
        record = json.loads(os.pread(fd, 1 << 16, 0).decode("utf-8") or "null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def unlock_run_folder(folder: str) -> None:
    """Release this process's run lock of ``folder`` (nothing if it holds none)."""
    held = _HELD.pop(os.path.realpath(folder), None)
    if held is not None:
        os.close(held[0])  # closing the only descriptor releases the flock
