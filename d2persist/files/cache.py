"""
What d2persist caches stays bounded: bundles downloaded from URLs (a version per manifest) and
ONNX Runtime's optimized graphs (one per model file) are stamped each time a process uses them,
and those no process used for :data:`UNUSED_FOR_S` are removed the next time an entry beside
them is cached or used. A removal first renames the entry out of use, so no process finds it
half removed; a process that loaded an entry before keeps what it loaded.
"""

import logging
import os
import shutil
import time
from typing import Callable, Iterable, List

from ..layout import TEMP_PREFIX

__all__ = ["UNUSED_FOR_S", "note_used", "discard", "remove_unused"]

logger = logging.getLogger(__name__)

#: how long a cached entry may go unused before it is removed (a week)
UNUSED_FOR_S = 7 * 86400.0


def note_used(path: str) -> None:
    """
    Stamp the cached entry ``path`` (a file or a folder) as used now: its modification time,
    which caching never changes otherwise. Quietly not where this process may not (a shared
    cache another user's process wrote).
    """
    try:
        os.utime(path)
    except OSError:
        pass


def discard(path: str) -> bool:
    """
    Take the entry ``path`` out of use at once (a rename, in its folder), then remove it.

    Returns:
        bool: whether this call took it (False: gone already, or another process took it).
    """
    folder, name = os.path.split(path)
    aside = os.path.join(folder, f"{TEMP_PREFIX}gone-{os.getpid()}-{name}")
    try:
        os.rename(path, aside)
    except OSError:
        return False
    if os.path.isdir(aside) and not os.path.islink(aside):
        shutil.rmtree(aside, ignore_errors=True)
    else:
        try:
            os.unlink(aside)
        except OSError:
            pass
    return True


def remove_unused(folder: str, keep: Iterable[str] = (),
                  is_entry: Callable[[str], bool] = lambda name: True,
                  unused_for_s: float = UNUSED_FOR_S) -> List[str]:
    """
    Remove the entries of ``folder`` that no process used for ``unused_for_s`` seconds (by
    :func:`note_used`'s stamp). Never raises: a cache that cannot be cleaned is still a cache.

    Args:
        folder (str): the cache folder whose entries to look at.
        keep (iterable[str]): names not to remove, whatever their age.
        is_entry (callable): whether a name is an entry (temporary files are not).
        unused_for_s (float): how long unused before removed.

    Returns:
        list[str]: the names removed.
    """
    kept = set(keep)
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    now = time.time()
    removed = []
    for name in names:
        if name in kept or name.startswith(TEMP_PREFIX) or not is_entry(name):
            continue
        path = os.path.join(folder, name)
        try:
            unused = now - os.stat(path).st_mtime > unused_for_s
        except OSError:
            continue
        if unused and discard(path):
            removed.append(name)
    if removed:
        logger.info("Removed %d cache entr%s unused for %g days from %s.", len(removed),
                    "y" if len(removed) == 1 else "ies", unused_for_s / 86400, folder)
    return removed
