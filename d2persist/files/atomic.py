"""
How d2persist's bytes reach disk.

Every file d2persist writes is a temporary file in the same folder, flushed and fsync'ed, moved
onto its name by ``os.replace``, then the folder fsync'ed (:func:`atomic_path`,
:func:`write_bytes`; with ``sync_folder=False`` the caller fsyncs the folder once after many
files). A crash at any moment leaves either the old file or the new one under the final name,
never a partial one.
"""

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
from typing import IO, Any, Callable, Iterator, List, Optional, Tuple

from ..errors import ArtifactError, CheckpointWriteError, OutputPathError, UnsafeArtifactError
from ..layout import TEMP_PREFIX

__all__ = [
    "atomic_path",
    "write_bytes",
    "write_text",
    "write_json",
    "sha256_file",
    "fsync_dir",
    "temp_name",
    "remove_temp_files",
    "torch_save",
    "resolve_inside",
    "sha256_stream",
    "check_output_file",
    "check_output_folder",
    "folder_mode",
    "file_identity",
    "check_unchanged",
]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


def _umask():
    try:  # Linux: read it without changing it (os.umask would, for every thread, for a moment)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask


def _file_mode():
    """The mode ``open()`` would give a new file under the current umask."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """The mode ``os.makedirs`` would give a new folder under the current umask."""
    return 0o777 & ~_umask()


def fsync_dir(path: str) -> None:
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


def temp_name(base: str) -> str:
    """
    A temporary file's name for the file ``base``: ``TEMP_PREFIX``, ``base`` cut to 120 bytes
    (a name of 230 bytes, allowed, would make one over the usual 255), a random part.
    """
    short = base.encode("utf-8", "surrogateescape")[:120].decode("utf-8", "ignore")
    return f"{TEMP_PREFIX}{short}.{secrets.token_hex(6)}"


def _create_temp(path: str) -> Tuple[int, str]:
    """
    A new, empty temporary file next to ``path``, opened for writing. Its mode is what
    ``open()`` would give (0666 less the umask, applied by the kernel), not ``mkstemp``'s 0600.

    Returns:
        tuple: ``(file descriptor, the temporary file's path)``.
    """
    folder, base = os.path.split(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(folder, temp_name(base))
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "No unused temporary name next to it", path)


@contextlib.contextmanager
def _replacing(path: str) -> Iterator[Tuple[int, str]]:
    """
    ``(descriptor, path)`` of a new temporary file next to ``path`` (see :func:`_create_temp`);
    on a clean exit the temporary file replaces ``path``, else it is removed. The body writes
    and fsyncs it, and closes the descriptor.
    """
    fd, tmp = _create_temp(path)
    try:
        yield fd, tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str, drop_cache: bool = False) -> Iterator[str]:
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
    with _replacing(path) as (fd, tmp):
        os.close(fd)  # written by name (torch.save, open(), ...)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
            if drop_cache and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    fsync_dir(os.path.dirname(tmp))


def write_bytes(path: str, data: bytes, sync_folder: bool = True) -> str:
    """
    Write ``data`` to ``path`` atomically (as :func:`atomic_path`, through one descriptor).

    Args:
        sync_folder (bool): fsync the folder after the rename. False leaves that to the
            caller (one :func:`fsync_dir` after many files): the file is whole under its name
            at once, and its name is durable once the caller has synced the folder.

    Returns:
        str: the sha256 hex digest of ``data``.
    """
    with _replacing(path) as (fd, tmp):
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    if sync_folder:
        fsync_dir(os.path.dirname(tmp))
    return hashlib.sha256(data).hexdigest()


def write_text(path: str, text: str) -> str:
    """Write a UTF-8 text file atomically. Returns its sha256 hex digest."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any) -> str:
    """Write ``obj`` as indented JSON atomically. Returns its sha256 hex digest."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def torch_save(obj: Any, path: str) -> Tuple[str, int]:
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


def sha256_stream(f: IO[bytes], on_chunk: Optional[Callable[[int], Any]] = None) -> str:
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


def sha256_file(path: str, on_chunk: Optional[Callable[[int], Any]] = None) -> str:
    """Returns the sha256 hex digest of the file at ``path`` (see :func:`sha256_stream`)."""
    with open(path, "rb") as f:
        return sha256_stream(f, on_chunk)


def file_identity(path: str) -> Optional[Tuple[int, int, int, int]]:
    """
    What changes when the file at ``path`` is replaced (a new inode, as every write here
    makes) or written in place. Taken before a file is verified and compared after it is
    loaded, it tells that the file loaded is the file verified, without reading it twice.

    Args:
        path (str): the file.

    Returns:
        tuple or None: ``(device, inode, size, mtime_ns)``; None if there is no such file.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def check_unchanged(path: str, identity: Optional[Tuple[int, int, int, int]]) -> None:
    """
    Refuse, in one sentence, a file replaced, changed or removed since ``identity`` was
    taken: what was loaded may not be what was verified.

    Args:
        path (str): the file.
        identity (tuple or None): its :func:`file_identity` from before it was verified.

    Raises:
        ArtifactError: the file at ``path`` changed.
    """
    now = file_identity(path)
    if now != identity:
        what = "removed while it was being loaded (the run's retention, or a new export" \
            if now is None else "replaced while it was being loaded (a new export or checkpoint"
        raise ArtifactError(f"{path} was {what} written meanwhile): load it again.")


def remove_temp_files(folder: str) -> List[str]:
    """
    Remove the temporary files (and folders: INT8 quantization's) a killed process left in
    ``folder``.

    Returns:
        list[str]: the names removed.
    """
    removed: List[str] = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        if name.startswith(TEMP_PREFIX):
            path = os.path.join(folder, name)
            with contextlib.suppress(FileNotFoundError):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                removed.append(name)
    if removed:
        logger.info("Removed temporary files left by an interrupted write: %s", removed)
    return removed


def resolve_inside(folder: str, name: str) -> str:
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


def check_output_file(path: str) -> None:
    """
    Refuse, in one sentence, a file path that a write (its folders made first) cannot create:
    a folder, a path under a file, or a URL (this writes on this machine).

    Args:
        path (str): the file to be written.

    Raises:
        OutputPathError: ``path`` is a folder, a file stands where a folder above it would, or
            this process may not write in the nearest folder that exists.
    """
    _check_not_url(path)
    if os.path.isdir(path):
        raise OutputPathError(f"Output {path} is a folder: name a file to write.")
    _check_folder_possible(os.path.dirname(os.path.abspath(path)), path)


def check_output_folder(path: str) -> None:
    """
    Refuse, in one sentence, a folder path that cannot be made (or used) as one, or a URL.

    Args:
        path (str): the folder to be written into.

    Raises:
        OutputPathError: ``path``, or a path above it, is a file, or this process may not
            write in the nearest folder that exists.
    """
    _check_not_url(path)
    _check_folder_possible(os.path.abspath(path), path)


def _check_not_url(path: str) -> None:
    """What is written here is written on this machine: a URL would become a local folder."""
    if "://" in str(path):
        raise OutputPathError(f"Output {path} is a URL: this writes files on this machine; write "
                              "here and copy them there.")


def _check_folder_possible(folder: str, path: str) -> None:
    """The nearest of ``folder`` and the paths above it that exists: a folder this process
    may write in."""
    while not os.path.lexists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    if os.path.isdir(folder):
        if not os.access(folder, os.W_OK | os.X_OK):  # before a model loads for minutes
            raise OutputPathError(f"Cannot write {path}: this process may not write in "
                                  f"{folder}.")
        return
    if folder == os.path.abspath(path):
        raise OutputPathError(f"Output folder {path} is a file.")
    raise OutputPathError(f"Cannot write {path}: {folder} is a file, not a folder.")
