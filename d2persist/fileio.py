"""
How d2persist's bytes reach disk and come back.

Every file d2persist writes goes through :func:`atomic_path`: a temporary file in the same
folder, flushed and fsync'ed, ``os.replace``d onto its name, then the folder fsync'ed. A crash at
any moment leaves either the old file or the new one under the final name, never a partial one.

Every file d2persist reads from an artifact goes through the safe loaders here: checkpoints with
``torch.load(weights_only=True)``, YAML with ``yaml.safe_load``. Neither executes code.
"""

import contextlib
import errno
import hashlib
import json
import logging
import os
import pickle
import tempfile
import zipfile

import yaml

from .errors import ArtifactError, CheckpointWriteError, RunFolderBusyError, UnsafeArtifactError
from .layout import LOCK_NAME, TEMP_PREFIX

__all__ = [
    "atomic_path",
    "write_bytes",
    "write_text",
    "write_json",
    "sha256_file",
    "fsync_dir",
    "remove_temp_files",
    "safe_torch_load",
    "torch_save",
    "safe_yaml_load",
    "safe_yaml_loads",
    "SafeLoader",
    "read_json",
    "resolve_inside",
    "sha256_stream",
    "lock_run_folder",
    "unlock_run_folder",
    "read_lock_holder",
    "note_run_started",
    "restarted_run_started",
]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


def _file_mode():
    """The mode ``open()`` would give a new file under the current umask."""
    try:  # Linux: read it without changing it (os.umask would, for every thread, for a moment)
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def fsync_dir(path):
    """
    Make a rename or unlink in folder ``path`` durable.

    Args:
        path (str): a folder.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, drop_cache=False):
    """
    A temporary path next to ``path`` to write; on a clean exit it replaces ``path`` atomically.

    The temporary file is fsync'ed before ``os.replace``, and the folder is fsync'ed after. If
    the block raises, the temporary file is removed and ``path`` is left as it was.

    Args:
        path (str): the final name.
        drop_cache (bool): once the file is on disk, drop its pages from the page cache. For
            big files written often (checkpoints): the kernel then need not reclaim other pages
            to make room for the next one, which measured here cost ~0.2 s of CPU per 100 MB.

    Yields:
        str: the temporary path (an empty file).
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX + os.path.basename(path) + ".", dir=folder)
    os.close(fd)
    try:
        os.chmod(tmp, _file_mode())  # mkstemp creates 0600
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
            if drop_cache and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def write_bytes(path, data):
    """
    Write ``data`` to ``path`` atomically.

    Returns:
        str: the sha256 hex digest of ``data``.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return hashlib.sha256(data).hexdigest()


def write_text(path, text):
    """Write a UTF-8 text file atomically. Returns its sha256 hex digest."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path, obj):
    """Write ``obj`` as indented JSON atomically. Returns its sha256 hex digest."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def torch_save(obj, path):
    """
    ``torch.save`` ``obj`` to ``path`` atomically, and hash the file.

    torch writes through an unbuffered file (whose writes release the GIL) and the hash reads
    the file back from the page cache (also without the GIL), so a save on a background thread
    takes little from the training thread. (A Python wrapper hashing each write cost training
    ~5% more here; ``torch.save`` to a path loses the errno of a failed write.) Once on disk, the
    file's pages leave the page cache (see :func:`atomic_path`).

    Raises:
        CheckpointWriteError: the write failed (disk full, permission denied, ...). The file that
            was at ``path`` before, if any, is intact.

    Returns:
        tuple[str, int]: sha256 hex digest and size in bytes of the file.
    """
    import torch

    try:
        with atomic_path(path, drop_cache=True) as tmp:
            with open(tmp, "wb", buffering=0) as f:
                torch.save(obj, f)
            digest, size = sha256_file(tmp), os.path.getsize(tmp)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise CheckpointWriteError(
            f"Could not write {path}: {reason}; earlier checkpoints are intact."
        ) from e
    except RuntimeError as e:  # torch wraps a failing write() in RuntimeError
        cause = e.__cause__ or e.__context__
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EACCES, errno.EIO):
            raise CheckpointWriteError(
                f"Could not write {path}: {os.strerror(cause.errno)}; "
                "earlier checkpoints are intact."
            ) from e
        raise
    return digest, size


def sha256_stream(f, on_chunk=None):
    """
    The sha256 hex digest of what the binary file object ``f`` holds from where it is.

    Args:
        on_chunk (callable or None): called with the byte count of each chunk read (a
            progress bar); hashlib releases the GIL while it hashes, so threads hash in
            parallel.
    """
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(_CHUNK), b""):
        h.update(chunk)
        if on_chunk is not None:
            on_chunk(len(chunk))
    return h.hexdigest()


def sha256_file(path, on_chunk=None):
    """Returns the sha256 hex digest of the file at ``path`` (see :func:`sha256_stream`)."""
    with open(path, "rb") as f:
        return sha256_stream(f, on_chunk)


def remove_temp_files(folder):
    """
    Remove the temporary files a killed process left in ``folder``.

    Returns:
        list[str]: the names removed.
    """
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        if name.startswith(TEMP_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, name))
                removed.append(name)
    if removed:
        logger.info("Removed temporary files left by an interrupted write: %s", removed)
    return removed


def safe_torch_load(path):
    """
    Load a torch file without executing code from it (``weights_only=True``).

    Raises:
        UnsafeArtifactError: the file holds Python objects that only a full unpickler could
            build: it would run code if loaded the unsafe way.
        ArtifactError: the file is missing, truncated or not a torch file.
    """
    import torch

    if not os.path.isfile(path):
        raise ArtifactError(f"Checkpoint {path} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise UnsafeArtifactError(
            f"Refusing to load {path}: it holds Python objects beyond tensors and plain data, "
            f"which could run code when unpickled{(' (' + detail.strip() + ')') if detail else ''}."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(
            f"Checkpoint {path} is truncated or not a torch file ({msg})."
        ) from None


class SafeLoader(yaml.SafeLoader):
    """
    ``yaml.SafeLoader`` that also builds detectron2's ``ShapeSpec`` (a record of four ints),
    which ``LazyConfig.save`` writes as a python tag in detectron2's own model configs. Every
    other python tag is refused.
    """


def _construct_shape_spec(loader, node):
    from detectron2.layers import ShapeSpec

    fields = loader.construct_mapping(node)
    if set(fields) - {"channels", "height", "width", "stride"} or not all(
        v is None or isinstance(v, int) for v in fields.values()
    ):
        raise yaml.constructor.ConstructorError(None, None, "a ShapeSpec of other fields",
                                                node.start_mark)
    return ShapeSpec(**fields)


SafeLoader.add_constructor(
    "tag:yaml.org,2002:python/object:detectron2.layers.shape_spec.ShapeSpec",
    _construct_shape_spec,
)


def safe_yaml_loads(text, where=None):
    """
    Parse YAML text with :class:`SafeLoader`.

    Args:
        where (str or None): where the text comes from: then errors are raised as
            :func:`safe_yaml_load` raises them, naming it; else YAML's own errors propagate.
    """
    if where is None:
        return yaml.load(text, Loader=SafeLoader)
    try:
        return yaml.load(text, Loader=SafeLoader)
    except yaml.constructor.ConstructorError as e:
        tag = getattr(e, "problem", "") or str(e)
        raise UnsafeArtifactError(
            f"Refusing to load {where}: it carries a YAML tag that would construct a Python "
            f"object ({tag.strip()})."
        ) from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ArtifactError(f"Config file {where} is not valid YAML ({type(e).__name__}).") \
            from None


def safe_yaml_load(path):
    """
    Read a YAML file with :class:`SafeLoader`: python tags are refused, never constructed.

    Raises:
        UnsafeArtifactError: the file carries a tag that would construct a Python object.
        ArtifactError: the file is missing or is not valid YAML.
    """
    try:
        with open(path, "r", encoding="utf-8") as f:
            return safe_yaml_loads(f, where=path)
    except FileNotFoundError:
        raise ArtifactError(f"Config file {path} does not exist.") from None
    except UnicodeDecodeError as e:
        raise ArtifactError(f"Config file {path} is not valid YAML ({type(e).__name__}).") \
            from None


def read_json(path):
    """Read a JSON file; a missing or malformed file is an :class:`ArtifactError`."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ArtifactError(f"{path} does not exist.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}).") from None


def resolve_inside(folder, name):
    """
    Join a file name taken from an artifact to its folder, refusing names that leave the folder.

    Args:
        folder (str): the artifact's folder.
        name (str): a relative file name read from the artifact.

    Returns:
        str: the absolute path.

    Raises:
        UnsafeArtifactError: ``name`` is absolute or points outside ``folder``.
    """
    root = os.path.realpath(folder)
    if not isinstance(name, str) or not name or os.path.isabs(name):
        raise UnsafeArtifactError(f"Refusing file name {name!r}: it must be relative to {folder}.")
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise UnsafeArtifactError(f"Refusing file name {name!r}: it points outside {folder}.")
    return path


# -- the run lock ---------------------------------------------------------------------------------

_HELD = {}  # realpath of a run folder -> (descriptor of its locked file, its record), here
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


def read_lock_holder(folder):
    """
    Who last took the run lock of ``folder`` (``{"host", "pid", "since"}``, and ``"started"``,
    ``"ppid"`` once that run got past its start-up checks), or None. Takes no lock: the record
    of a process that died stays in the file until the next run takes it.
    """
    try:
        with open(os.path.join(folder, LOCK_NAME), "r", encoding="utf-8") as f:
            holder = json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _write_record(fd, record):
    # in place, never replaced: the lock belongs to this inode
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
    os.fsync(fd)


def lock_run_folder(folder):
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
        if e.errno not in _NO_LOCKS:
            raise ArtifactError(f"Cannot lock {path}: {os.strerror(e.errno)}.") from None
        logger.warning("The file system of %s has no flock (%s): a second training into this "
                       "folder will not be kept out.", folder, os.strerror(e.errno))
        return False
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    _write_record(fd, record)
    _HELD[key] = (fd, record)
    return True


def note_run_started(folder):
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


def restarted_run_started(folder):
    """
    Whether the last holder of ``folder``'s run lock was started by this process's launcher
    (same host, same parent process) and got past its start-up checks: what a worker that
    torchrun restarted asks before it resumes by itself.
    """
    import socket

    holder = read_lock_holder(folder) or {}
    return bool(holder.get("started")) and holder.get("host") == socket.gethostname() and \
        holder.get("ppid") == os.getppid()


def unlock_run_folder(folder):
    """Release this process's run lock of ``folder`` (nothing if it holds none)."""
    held = _HELD.pop(os.path.realpath(folder), None)
    if held is not None:
        os.close(held[0])  # closing the only descriptor releases the flock
