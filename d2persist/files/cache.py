"""
What d2persist caches stays bounded: bundles downloaded from URLs (a version per manifest) and
ONNX Runtime's optimized graphs (one per model file) are stamped each time a process uses them,
and those no process used for :data:`UNUSED_FOR_S` are removed as a bundle is loaded (the
bundles) or another graph is cached (the graphs). A removal first renames the entry out of use,
so no process finds it half removed; a process that loaded an entry before keeps what it
loaded.
"""

import logging
import os
import secrets
import shutil
import time
from typing import Callable, Iterable, List

from ..layout import TEMP_PREFIX

__all__ = ["UNUSED_FOR_S", "STALE_TEMP_S", "note_used", "discard", "remove_unused"]

logger = logging.getLogger(__name__)

#: how long a cached entry may go unused before it is removed (a week)
UNUSED_FOR_S = 7 * 86400.0
#: how old a temporary file or folder of a write is when it counts as left by a killed process
STALE_TEMP_S = 86400.0


def note_used(path: str) -> None:
    """
    Stamp the cached entry ``path`` (a file or a folder) as used now: its modification time,
    which caching never changes otherwise. Quietly not where this process may not (a shared
    cache another user's process wrote).

    Args:
        path (str): the entry.
    """
    try:
        os.utime(path)
    except OSError:
        pass


def discard(path: str) -> bool:
    """
    Take the entry ``path`` out of use at once (a rename, in its folder), then remove it.

    Args:
        path (str): the entry (a file or a folder).

    Returns:
        bool: whether this call took it (False: gone already, or another process took it).
    """
    aside = _aside(path)
    try:
        os.rename(path, aside)
    except OSError:
        return False
    _remove(aside)
    return True


def remove_unused(folder: str, keep: Iterable[str] = (),
                  is_entry: Callable[[str], bool] = lambda name: True,
                  unused_for_s: float = UNUSED_FOR_S) -> List[str]:
    """
    Remove the entries of ``folder`` that no process used for ``unused_for_s`` seconds (by
    :func:`note_used`'s stamp), and the temporary files and folders (``TEMP_PREFIX``) that
    a process killed while writing left there over :data:`STALE_TEMP_S` ago. An entry a
    process stamps while it is being taken is put back. Never raises: a cache that cannot be
    cleaned is still a cache.

    Args:
        folder (str): the cache folder whose entries to look at.
        keep (iterable[str]): names not to remove, whatever their age.
        is_entry (callable): whether a name (not a temporary one) is an entry.
        unused_for_s (float): how long unused before removed.

    Returns:
        list[str]: the names removed.
    """
    kept = set(keep)
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    removed = []
    for name in names:
        temp = name.startswith(TEMP_PREFIX)
        if name in kept or not (temp or is_entry(name)):
            continue
        path = os.path.join(folder, name)
        limit = STALE_TEMP_S if temp else unused_for_s
        if not _unused(path, limit):
            continue
        aside = _aside(path)
        try:
            os.rename(path, aside)
        except OSError:  # gone meanwhile (another process took it)
            continue
        if not _unused(aside, limit):  # stamped between the look and the rename: in use
            try:
                os.rename(aside, path)
                continue
            except OSError:  # made again meanwhile: this copy goes
                pass
        _remove(aside)
        removed.append(name)
    if removed:
        logger.info("Removed from %s what no process used for %g days: %s.", folder,
                    unused_for_s / 86400, ", ".join(removed))
    return removed


def _unused(path: str, seconds: float) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime > seconds
    except OSError:
        return False


def _aside(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f"{TEMP_PREFIX}gone-{secrets.token_hex(6)}-{name}")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass
