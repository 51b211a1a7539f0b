"""
Where a run folder or bundle lies: a local folder, or a mirror URL read through fsspec. The
view reads names and bytes through these and nothing else.
"""

import contextlib
import logging
import os
import posixpath
import shutil
import tempfile
from typing import Optional, Union

from ..errors import ArtifactError, UnsafeArtifactError
from ..files.atomic import resolve_inside, sha256_file, sha256_stream
from ..files.mirror import Mirror, is_url

__all__ = []

logger = logging.getLogger(__name__)
#: Below this many bytes to hash, ``verify`` shows no progress bar.
_PROGRESS_BYTES = 32 << 20


# -- where the bytes are: a local folder or a mirror ------------------------------------------

class _LocalFolder:
    """A folder on this machine."""

    remote = False

    def __init__(self, path):
        self.path = path

    def where(self, name):
        return os.path.join(self.path, name)

    def names(self):
        return os.listdir(self.path) if os.path.isdir(self.path) else []

    def isdir(self):
        return os.path.isdir(self.path)

    def stat(self, name):
        """(size, mtime, identity) of file ``name``, or None; equal identities: hard links."""
        try:
            st = os.stat(self.where(name))
        except OSError:
            return None
        if not os.path.isfile(self.where(name)):
            return None
        return st.st_size, st.st_mtime, (st.st_dev, st.st_ino)

    def exists_now(self, name):
        """Whether file ``name`` is there now."""
        return os.path.isfile(self.where(name))

    def read(self, name: str) -> Optional[bytes]:
        """The bytes of file ``name``; None if there is none, one sentence if it cannot be read."""
        try:
            with open(self.where(name), "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError):
            return None  # (ValueError: a NUL in the name)
        except OSError as e:  # there, and not readable (a permission): not "missing"
            raise ArtifactError(f"Cannot read {self.where(name)}: {e.strerror or e}.") from None

    def sha256(self, name, on_chunk=None):
        return sha256_file(self.where(name), on_chunk)

    def child(self, name):
        """The subfolder ``name`` (an absolute ``name`` is taken as it is, as os.path.join does)."""
        if isinstance(name, str) and os.path.isabs(name):
            return _LocalFolder(name)
        resolve_inside(self.path, name)  # refuses a name that leaves the folder
        return _LocalFolder(os.path.join(self.path, name))

    @contextlib.contextmanager
    def local(self, name):
        yield self.where(name)


class _MirrorFolder:
    """A folder at an fsspec URL (a run's mirror, or a bundle uploaded there)."""

    remote = True

    def __init__(self, url, mirror=None):
        self.path = url.rstrip("/")
        self.mirror = mirror or Mirror(self.path)
        self._listing = None
        self.is_file = False  # the URL names an object, not a folder (known once listed)

    def where(self, name):
        return f"{self.path}/{name}"

    def _info(self):
        if self._listing is None:
            fs = self.mirror.fs
            try:
                entries = fs.ls(self.mirror.root, detail=True)
            except FileNotFoundError:
                entries = []
            root = self.mirror.root.rstrip("/")
            itself = [e for e in entries if e["name"].rstrip("/") == root]
            # an object's URL lists the object; a folder made in a console, its marker
            self.is_file = len(entries) == 1 and any(
                e.get("type") == "file" and not e["name"].endswith("/") for e in itself)
            self._listing = {os.path.basename(e["name"].rstrip("/")): e for e in entries
                             if e["name"].rstrip("/") != root}
        return self._listing

    def names(self):
        return sorted(n for n, e in self._info().items() if e.get("type") != "directory")

    def isdir(self):
        return bool(self._info())

    def stat(self, name):
        e = self._info().get(name)
        if e is None or e.get("type") == "directory":
            return None
        mtime = e.get("mtime") or e.get("LastModified") or e.get("updated") or e.get("created")
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        elif isinstance(mtime, str):
            from datetime import datetime

            try:
                mtime = datetime.fromisoformat(mtime.replace("Z", "+00:00")).timestamp()
            except ValueError:
                mtime = 0.0
        return int(e.get("size") or 0), float(mtime or 0.0), None  # objects have no hard links

    def exists_now(self, name):
        """Whether object ``name`` is there now (asked again, not from the listing)."""
        path = self.mirror._path(name)
        try:
            self.mirror.fs.invalidate_cache(path)
            return bool(self.mirror.fs.exists(path))
        except Exception:  # noqa: BLE001 (cannot tell: taken as there, checked as such)
            return True

    def _failed(self, name, e):
        return ArtifactError(f"Cannot read {self.where(name)} ({type(e).__name__}: {e}).")

    def read(self, name: str) -> Optional[bytes]:
        if name not in self._info():
            return None
        try:
            return self.mirror.fs.cat_file(self.mirror._path(name))
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 (fsspec backends raise many kinds)
            raise self._failed(name, e) from None

    def sha256(self, name, on_chunk=None):
        try:
            with self.mirror.fs.open(self.mirror._path(name), "rb", block_size=8 << 20) as f:
                return sha256_stream(f, on_chunk)
        except Exception as e:  # noqa: BLE001
            raise self._failed(name, e) from None

    def child(self, name):
        return _MirrorFolder(self.where(_remote_name(name, self.path)))

    @contextlib.contextmanager
    def local(self, name):
        """The object ``name`` downloaded into a temporary folder, for the time of the block."""
        try:
            tmp = tempfile.mkdtemp(prefix="d2persist-view-")
        except OSError as e:  # no temporary folder this process can write
            raise ArtifactError(f"Cannot download {self.where(name)}: no temporary folder "
                                f"({e}); set TMPDIR to a folder with room.") from None
        try:
            path = os.path.join(tmp, os.path.basename(name))
            try:
                self.mirror.fs.get_file(self.mirror._path(name), path)
            except Exception as e:  # noqa: BLE001
                raise self._failed(name, e) from None
            yield path
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


#: Where a view reads: a local folder or a mirror URL.
_Folder = Union[_LocalFolder, _MirrorFolder]


def _remote_name(name, where):
    """``name`` of a file under the URL ``where``, normalized; refused if it leaves it."""
    if not isinstance(name, str) or not name or name.startswith("/"):
        raise UnsafeArtifactError(f"Refusing file name {name!r}: it must be relative to {where}.")
    norm = posixpath.normpath(name)
    if norm == "." or norm == ".." or norm.startswith("../"):
        raise UnsafeArtifactError(f"Refusing file name {name!r}: it points outside {where}.")
    return norm


def _folder(path):
    if is_url(path) or (isinstance(path, str) and path.startswith("file://")):
        try:
            return _MirrorFolder(path)
        except Exception as e:  # fsspec raises many kinds (unknown protocol, missing package)
            raise ArtifactError(f"Cannot read {path} ({type(e).__name__}: {e}).") from None
    return _LocalFolder(path)
