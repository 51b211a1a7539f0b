"""
A mirror of a run folder in object storage or any fsspec location (``s3://``, ``gs://``,
``az://``, ``file://``), filled from a background thread.

fsspec's protocol packages (s3fs, gcsfs, adlfs) and their usual credentials and configuration
(environment, config files, ``FSSPEC_*`` variables) are used as they are; nothing is hard-coded.
An object store creates an object only once its upload is complete; on a file system a copy is
written under a temporary name and renamed. Each upload job is a sequence (a checkpoint, its
sha256, then ``last_checkpoint``): if one upload fails, the rest of its job is skipped, so the
mirror never names an object that is not completely there.
"""

import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import ConfigError
from ..layout import LAST_CHECKPOINT, LOCK_NAME, METRICS_NAME, SIDECAR_SUFFIX
from .atomic import atomic_path

__all__ = ["Mirror", "Uploader", "RunMirror", "check_mirror", "is_url", "is_local_fs"]

logger = logging.getLogger(__name__)

#: One step of an upload job: ``(name, source)``, source a local file, bytes, or None (remove).
_Step = Tuple[str, Optional[Union[str, bytes]]]


def is_url(path: str) -> bool:
    """Whether ``path`` is an fsspec URL (``proto://...``) rather than a local path."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def is_local_fs(fs: Any) -> bool:
    """Whether the fsspec filesystem ``fs`` is this machine's (its paths are files here)."""
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def check_mirror(url: str, output_dir: str) -> None:
    """
    Refuse, in one sentence, a ``PERSIST.MIRROR`` a run cannot mirror to: a URL of no
    filesystem here (an unknown protocol, or its package missing), a relative path (a URL
    mistyped, "s3:/bucket", is one), or a folder of this machine
    that is the run's folder, inside it or above it, or another run's folder (it holds a run
    lock file): the copies would overwrite the run's own files or another run's.

    Args:
        url (str): the mirror's URL (or a local path).
        output_dir (str): the run's folder.

    Raises:
        ConfigError: such a mirror.
    """
    import fsspec

    if "://" not in url and not os.path.isabs(url):  # ("s3:/bucket", "bucket/runs": folders)
        raise ConfigError(f"PERSIST.MIRROR {url!r} is neither a URL (e.g. s3://bucket/runs/a) "
                          "nor an absolute folder: a relative one is a folder here that moves "
                          "with the working directory.")
    try:
        fs, root = fsspec.core.url_to_fs(url.rstrip("/"))
    except (ValueError, ImportError) as e:  # e.g. "Protocol not known", gcsfs not installed
        raise ConfigError(f"PERSIST.MIRROR {url!r} cannot be used ({type(e).__name__}: "
                          f"{e}).") from None
    if not is_local_fs(fs):
        return
    mirror, run = os.path.realpath(root), os.path.realpath(output_dir)
    if os.path.commonpath([mirror, run]) in (mirror, run):
        raise ConfigError(f"PERSIST.MIRROR {url!r} is the run's folder {output_dir}, inside it "
                          "or above it: mirror to a folder of its own.")
    if os.path.exists(os.path.join(mirror, LOCK_NAME)):
        raise ConfigError(f"PERSIST.MIRROR {url!r} is another run's folder (it holds "
                          f"{LOCK_NAME}): mirror to a folder of its own.")


class Mirror:
    """A folder at an fsspec URL: put, get, remove and read files by name."""

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = is_local_fs(self.fs)

    def _path(self, name):
        return f"{self.root}/{name}"

    def _upload(self, name, send):
        """``send(remote_path)``, so that ``name`` exists only once it is complete."""
        if not self.local:  # an object store creates the object when its upload completes
            send(self._path(name))
            return
        tmp = self._path(f"{name}.d2persist-tmp")
        self.fs.makedirs(os.path.dirname(tmp), exist_ok=True)
        send(tmp)
        self.fs.mv(tmp, self._path(name))

    def put(self, local: str, name: str) -> None:
        """Upload the file ``local`` as ``name``; complete before the name exists."""
        self._upload(name, lambda remote: self.fs.put_file(local, remote))

    def put_bytes(self, data: bytes, name: str) -> None:
        """Upload ``data`` as ``name``; complete before the name exists."""
        self._upload(name, lambda remote: self.fs.pipe_file(remote, data))

    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self._path(name))
        except FileNotFoundError:
            pass

    def read_text(self, name: str) -> Optional[str]:
        """The text of ``name``, or None if there is no such file."""
        try:
            return self.fs.cat_file(self._path(name)).decode("utf-8")
        except FileNotFoundError:
            return None

    def names(self, prefix: str = "") -> List[str]:
        """File names directly in the mirror (or in its folder ``prefix``)."""
        try:
            entries = self.fs.ls(self._path(prefix) if prefix else self.root, detail=False)
        except FileNotFoundError:
            return []
        return sorted(os.path.basename(e.rstrip("/")) for e in entries)

    def get(self, name: str, local: str) -> None:
        """Download ``name`` to ``local``, atomically."""
        with atomic_path(local) as tmp:
            self.fs.get_file(self._path(name), tmp)


class Uploader:
    """
    Uploads to a :class:`Mirror` from one background thread, in order. A failing upload is
    retried, then reported once (later failures are counted); it never reaches training. After a
    failure, later uploads get one try each until one succeeds again.
    """

    def __init__(self, mirror: Mirror, tries: int = 3, backoff: float = 0.5):
        self.mirror, self.tries, self.backoff = mirror, tries, backoff
        self._jobs: "queue.Queue[Optional[List[_Step]]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self.failures = 0
        self._down = False  # the last upload failed: the mirror is likely unreachable
        #: called with a name this thread removed from the mirror (or found gone)
        self.on_removed: Optional[Callable[[str], None]] = None

    def submit(self, steps: Sequence[_Step]) -> None:
        """
        Queue one job: ``(name, source)`` steps, done in order: ``source`` is a local file to
        upload, ``bytes`` to upload (a pointer as it was when the job was queued), or None to
        remove ``name`` from the mirror. A failed step skips the rest of its job.
        """
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="d2persist-mirror", daemon=True
            )
            self._thread.start()
        self._jobs.put(list(steps))

    def _run(self):
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                for name, local in job:
                    if not self._step(name, local):
                        break
            finally:
                self._jobs.task_done()

    def _step(self, name, source):
        if isinstance(source, str) and not os.path.isfile(source):
            return False  # removed locally (retention) before its turn: its job is moot
        # while the mirror is down (the last upload failed), one try each: the run's end does
        # not wait for every queued upload's retries against a dead store
        tries = 1 if self._down else self.tries
        for attempt in range(tries):
            try:
                if source is None:
                    self.mirror.remove(name)
                    if self.on_removed is not None:
                        self.on_removed(name)
                elif isinstance(source, bytes):
                    self.mirror.put_bytes(source, name)
                else:
                    self.mirror.put(source, name)
                self._down = False
                return True
            except Exception as e:  # fsspec backends raise many kinds; training must go on
                if attempt + 1 < tries:
                    time.sleep(self.backoff * 2**attempt)
                    continue
                self._down = True
                self.failures += 1
                if self.failures == 1:
                    reason = str(e).splitlines()[0][:200] if str(e) else ""
                    logger.error(
                        "Could not copy %s to the mirror %s after %d tries (%s: %s); the local "
                        "run is intact, and later failures are only counted.",
                        name, self.mirror.url, self.tries, type(e).__name__, reason,
                    )
                return False

    def wait(self) -> float:
        """Block until every queued upload is done; returns the seconds waited."""
        start = time.perf_counter()
        self._jobs.join()
        return time.perf_counter() - start

    def close(self) -> None:
        """End the upload thread once every queued upload is done (a later job starts one)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None


class RunMirror:
    """
    The upload jobs of one run folder to its mirror, in the order that keeps the mirror
    consistent: a file before anything names it, a checkpoint's sha256 with it,
    ``last_checkpoint`` as it was when the job was queued, removals last (but those of
    ``remove_first``, which make a bundle incomplete before its files change). A checkpoint the
    run's retention retired is removed only by a job that uploaded and named a newer one (a
    failed or skipped upload never leaves the mirror without a checkpoint to resume from).
    Training never waits.

    Args:
        url (str): ``PERSIST.MIRROR``.
        output_dir (str): the run folder whose files are uploaded.
    """

    def __init__(self, url: str, output_dir: str):
        self.uploader = Uploader(Mirror(url))
        self.uploader.on_removed = self._removed
        self.output_dir = output_dir
        # retired names not yet removed from the mirror (an ordered set, shared with the thread)
        self._retired: Dict[str, None] = {}
        self._lock = threading.Lock()

    def _removed(self, name):
        with self._lock:
            self._retired.pop(name, None)

    @property
    def url(self) -> str:
        return self.uploader.mirror.url

    def upload(self, *names: str, folder: Optional[str] = None, remove: Sequence[str] = (),
               tag: Optional[str] = None, retire: Sequence[str] = (),
               remove_first: Sequence[str] = ()) -> None:
        """
        Queue one job: the removals of ``remove_first``, then ``names`` (files of the run
        folder, or of its subfolder ``folder``) in this order, then ``last_checkpoint`` naming
        ``tag``, then the removals of ``remove``.
        With ``tag``, then also the removals of ``retire`` (checkpoints the retention removed
        here) and of those earlier jobs retired and did not remove (their job failed): a job
        that fails before its end removes none of them.
        A checkpoint uploaded with its sidecar loses the mirror's old sidecar first, in the same
        job (``model_final.pth``, ``model_best.pth`` are written again under their name): a copy
        stopped between the two uploads leaves one without a sidecar, never new bytes beside
        the old hash.
        """
        base = os.path.join(self.output_dir, folder) if folder else self.output_dir
        prefix = f"{folder}/" if folder else ""
        steps: List[_Step] = [(prefix + n, None) for n in remove_first]
        steps += [(prefix + n + SIDECAR_SUFFIX, None) for n in names
                  if n + SIDECAR_SUFFIX in names]
        steps += [(prefix + n, os.path.join(base, n)) for n in names]
        if tag is not None:
            steps.append((LAST_CHECKPOINT, tag.encode("utf-8")))
        steps += [(prefix + n, None) for n in remove]
        if retire and tag is None:
            raise ValueError("retire= needs tag=: a retired checkpoint is removed only after a "
                             "newer one is named.")
        if tag is not None:
            with self._lock:
                self._retired.update((n, None) for n in retire)
                for n in (tag, tag + SIDECAR_SUFFIX):  # named again: no longer retired
                    self._retired.pop(n, None)
                steps += [(n, None) for n in self._retired]
        self.uploader.submit(steps)

    def upload_metrics(self) -> None:
        """``metrics.json`` as it is now (a line still being appended is skipped by readers)."""
        if os.path.isfile(os.path.join(self.output_dir, METRICS_NAME)):
            self.upload(METRICS_NAME)

    def finish(self) -> None:
        """Upload ``metrics.json`` a last time and wait for every job; log what failed."""
        self.upload_metrics()
        waited = self.uploader.wait()
        self.uploader.close()  # (a process training again starts another: no thread left)
        failures = self.uploader.failures
        logger.info(
            "Mirror %s: waited %.1f s for the last uploads%s.", self.url, waited,
            f"; {failures} upload(s) failed, the local run is complete" if failures else "",
        )
