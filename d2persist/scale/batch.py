"""
``d2persist predict``: every image of a source predicted into a destination exactly once,
resumable by running the same command again.

A source is a folder, a glob, a text file listing image paths, or an fsspec URL of any of them
(``s3://bucket/images/``); a destination a folder or an fsspec URL. For each input image the
destination gets one output, named after the image's path relative to the source: ``REL.json``
(what ``tools/infer_single.py`` writes for it: same schema, same numbers for the same backend),
with ``--pictures`` also ``REL.png``, or, for an image that cannot be read, ``REL.error.json``
(its path and one sentence). Each is written atomically (a local temp file, fsync'ed, and
``os.replace``; an object store's single put), the JSON last, so an input whose JSON exists and
no error record beside it is done. Local folders are fsync'ed once per batch of images, before
the batch counts as done (a picture's folder at once, before its JSON names it done).

``.d2persist-predict.json`` at the destination records the job (the weights' sha256, backend,
precision, threshold, pictures) when it starts: a rerun of the same job skips what is done; a
rerun with other weights or options is refused. ``job.json`` is written last, when every input
has its output.
"""

import collections
import contextlib
import datetime
import json
import logging
import os
import posixpath
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple,
                    Union)

from ..artifacts.bundle import software_versions
from ..errors import D2PersistError, InputImageError, OutputPathError
from ..files.atomic import check_output_folder, fsync_dir, temp_name, write_bytes
from ..files.mirror import Mirror, is_local_fs
from ..layout import DEFAULT_MIN_SCORE, PREDICT_JOB_NAME, PREDICT_OPTIONS_NAME, TEMP_PREFIX
from ..predict.images import check_image_bytes, encode_png
from ..predict.infer import IMAGE_EXTENSIONS, json_text
from .ray_nodes import check_ray_nodes, check_same_weights, cpus_per_copy, refusal_on_node

__all__ = ["Source", "list_source", "check_destination", "predict_source", "job_identity",
           "RayEngine"]

logger = logging.getLogger(__name__)


@dataclass
class Source:
    """
    The images of a source.

    Attributes:
        fs: the fsspec filesystem they are on.
        items (list[tuple[str, str]]): ``(path on fs, name relative to the source)``, sorted;
            ``name`` is ``path`` relative to ``base``.
        local (bool): whether ``fs`` is the local filesystem (paths are files here).
        base (str): the folder the names are relative to.
        url (str): the source, as one URL (the job's identity).
        missing (list[tuple[str, str]]): items of a list file that do not exist.
    """

    fs: Any
    items: List[Tuple[str, str]] = field(default_factory=list)
    local: bool = True
    base: str = ""
    url: str = ""
    missing: List[Tuple[str, str]] = field(default_factory=list)


def _shown(source: Source, path: str) -> str:
    """An image's path as sentences and records name it: its URL where it is not local."""
    return path if source.local else source.fs.unstrip_protocol(path)


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def list_source(src: str) -> Source:
    """
    The images of ``src``: a folder (recursively), a glob (``*``, ``?``, ``[``), a text file
    listing one path per line (relative paths: to the file's folder), or an fsspec URL of one.

    Raises:
        InputImageError: ``src`` does not exist, holds no image, or cannot be read (a store
            that does not answer, credentials refused).
    """
    try:
        return _list_source(src)
    except D2PersistError:
        raise
    except Exception as e:  # noqa: BLE001 (fsspec backends raise many kinds)
        raise InputImageError(f"Cannot read {src} ({type(e).__name__}: "
                              f"{' '.join(str(e).split())}).") from None


def _not_listed(fs: Any, paths: List[str]) -> List[str]:
    """
    Those of ``paths`` that are not there: one listing per folder, not one request per path
    (a list of a million images in a bucket); a path its folder's listing leaves out, or of a
    folder that cannot be listed (credentials that read objects and list nothing, a web
    server without index pages), asked on its own.
    """
    folders: Dict[str, Set[str]] = {}
    for folder in sorted({posixpath.dirname(p) for p in paths}):
        try:
            folders[folder] = {e.rstrip("/") for e in fs.ls(folder, detail=False)}
        except Exception:  # noqa: BLE001 (fsspec backends raise many kinds): not known
            folders[folder] = set()
    return [p for p in paths if p not in folders[posixpath.dirname(p)] and not fs.isfile(p)]


def _list_source(src: str) -> Source:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(src)
    except (ValueError, ImportError) as e:  # an unknown protocol, or its package missing
        raise InputImageError(f"Cannot read {src} ({type(e).__name__}: {e}).") from None
    local = is_local_fs(fs)
    sep = "/"  # fsspec paths, on every filesystem
    missing: List[str] = []
    if any(c in root for c in "*?["):
        paths = sorted(p for p in fs.glob(root) if _is_image(p) and fs.isfile(p))
        base = root[: min(root.index(c) for c in "*?[" if c in root)].rsplit(sep, 1)[0]
    elif fs.isdir(root):
        paths = sorted(p for p in fs.find(root) if _is_image(p))
        base = root.rstrip(sep)
    elif fs.isfile(root) and not _is_image(root):  # a list of paths
        folder = posixpath.dirname(root)
        try:
            lines = fs.cat_file(root).decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise InputImageError(
                f"{src} is neither an image ({', '.join(IMAGE_EXTENSIONS)}) nor a text file "
                "listing images.") from None
        listed = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
        # a URL of the list's own filesystem, an absolute path, or one relative to the list;
        # normalized ("../b.jpg" is under the folder above, and so is its output's name)
        paths = [posixpath.normpath(fs._strip_protocol(p) if "://" in p
                                    else posixpath.join(folder, p)) for p in listed]
        base = posixpath.commonpath([posixpath.dirname(p) for p in paths]) if paths else folder
        missing = _not_listed(fs, paths)
    elif fs.isfile(root):
        paths, base = [root], posixpath.dirname(root)
    else:
        raise InputImageError(f"{src} does not exist.")
    if not paths:
        raise InputImageError(f"{src} holds no image ({', '.join(IMAGE_EXTENSIONS)}).")
    base = base or sep  # (a source at the filesystem's root)
    items = [(p, posixpath.relpath(p, base)) for p in paths]
    counts = collections.Counter(n for _, n in items)
    twins = sorted(n for n, c in counts.items() if c > 1)
    if twins:
        raise InputImageError(f"Several inputs of {src} would be named {twins[0]!r} at the "
                              "destination; list them from one source folder.")
    absent = set(missing)
    return Source(fs, sorted((x for x in items if x[0] not in absent), key=lambda x: x[1]),
                  local, base, fs.unstrip_protocol(root),
                  [x for x in items if x[0] in absent])


class _Destination(Mirror):
    """
    A folder or fsspec URL receiving the outputs: a :class:`Mirror` whose local files are
    written as every local file here (temp file, fsync, ``os.replace``), the folders fsync'ed
    by :meth:`sync` (once per batch of files, not once per file).
    """

    def __init__(self, dst: str, make: bool = True) -> None:
        try:
            super().__init__(dst)
        except (ValueError, ImportError) as e:  # an unknown protocol, or its package missing
            raise OutputPathError(f"Cannot write to {dst} ({type(e).__name__}: {e}).") from None
        self._unsynced: Set[str] = set()
        if self.local:
            check_output_folder(self.root)
            if make:
                os.makedirs(self.root, exist_ok=True)

    @contextlib.contextmanager
    def _remote(self, doing: str) -> Iterator[None]:
        """
        An object store's error (s3fs's PermissionError has no errno) as one sentence; here,
        errors as they are (a file error names its file: the CLI says it in one sentence).
        """
        if self.local:
            yield
            return
        try:
            yield
        except D2PersistError:
            raise
        except Exception as e:  # noqa: BLE001 (fsspec backends raise many kinds)
            raise OutputPathError(
                f"Cannot {doing} {self.url} ({type(e).__name__}: {e}); what is written there "
                "is whole: run the same command again once it can be used.") from None

    def exists(self, name: str) -> bool:
        with self._remote("read"):
            return bool(self.fs.exists(self._path(name)))

    def write(self, name: str, data: bytes, sync: bool = False) -> None:
        """
        Write file ``name`` whole: here, its name durable at the next :meth:`sync`; on an
        object store, one put (the object appears whole or not at all).

        Args:
            name (str): relative to the destination.
            data (bytes): the file's content.
            sync (bool): here, fsync its folder at once.
        """
        if not self.local:
            with self._remote("write to"):
                self.put_bytes(data, name)
            return
        path = self._path(name)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        write_bytes(path, data, sync_folder=sync)
        if not sync:
            self._unsynced.add(folder)

    def create(self, name: str, data: bytes) -> bool:
        """
        Write file ``name`` whole unless it exists: here exclusively (of two processes at
        once, one creates it: a complete temp file hard-linked to the name; a file system
        without hard links cannot tell); on an object store, one put (which cannot tell).

        Args:
            name (str): relative to the destination.
            data (bytes): the file's content.

        Returns:
            bool: whether this call wrote it (False: it exists).
        """
        if not self.local:
            with self._remote("write to"):
                self.put_bytes(data, name)
            return True
        path = self._path(name)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, temp_name(os.path.basename(path)))  # (one volume)
        write_bytes(tmp, data, sync_folder=False)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: not exclusive there
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        fsync_dir(folder)
        return True

    def remove(self, name: str) -> None:
        with self._remote("write to"):
            super().remove(name)
        if self.local:
            self._unsynced.add(os.path.dirname(self._path(name)))

    def sync(self) -> None:
        """Make the names written and removed since the last call durable (fsync folders)."""
        while self._unsynced:
            fsync_dir(self._unsynced.pop())


def _json_bytes(data: dict) -> bytes:
    return json_text(data).encode("utf-8")


def job_identity(predictor: Any, source: str, min_score: float, pictures: bool
                 ) -> Dict[str, Any]:
    """
    What makes two jobs the same: the source (one URL), the weights' sha256, backend,
    precision and options.
    """
    return {"src": source, "weights_sha256": predictor.sha256, "backend": predictor.backend,
            "precision": predictor.precision, "confidence_threshold": float(min_score),
            "pictures": bool(pictures)}


def check_destination(dst: Union[str, _Destination]) -> None:
    """
    Refuse, in one sentence, a destination no job can write into: a file, a URL of no
    filesystem here, or a folder holding files that no ``d2persist predict`` job wrote (what
    the job would take for its outputs, and its ``job.json`` would replace). Left aside: a
    temp file of a job's record whose write was cut short, and an object store's marker of
    an empty folder.

    Args:
        dst (str): the destination, a folder or an fsspec URL (or one already opened).

    Raises:
        OutputPathError: such a destination.
    """
    out = dst if isinstance(dst, _Destination) else _Destination(dst, make=False)
    try:
        if out.read_text(PREDICT_OPTIONS_NAME) is not None:
            return  # a job's destination: _check_same_job tells whether it is this job's
        if not out.local:  # a store's "folder" exists once written: its bucket must already
            bucket = out.root.split("/", 1)[0]
            try:
                if bucket:  # (paths from "/" have none: memory, hdfs, ssh)
                    out.fs.info(bucket)
            except FileNotFoundError:  # (only a store that says so: access scoped to a
                raise OutputPathError(  # prefix may not see the bucket itself)
                    f"Cannot write to {out.url}: there is no {bucket} there.") from None
            except Exception:  # noqa: BLE001 (cannot tell: the listing and writes will say)
                pass
        try:
            entries = out.fs.ls(out.root, detail=False)
        except FileNotFoundError:
            return
    except D2PersistError:
        raise
    except Exception as e:  # noqa: BLE001 (fsspec backends raise many kinds)
        raise OutputPathError(f"Cannot write to {out.url} ({type(e).__name__}: "
                              f"{' '.join(str(e).split())}).") from None
    root = out.root.rstrip("/")
    names = [posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != root]
    others = [n for n in names if not n.startswith(TEMP_PREFIX)
              and not n.endswith(".d2persist-tmp") and n != PREDICT_OPTIONS_NAME]
    if others:
        raise OutputPathError(
            f"{out.url} already holds files no d2persist predict job wrote (such as "
            f"{others[0]!r}): predict into an empty or new --output.")


def _check_same_job(dst: _Destination, identity: Dict[str, Any]) -> None:
    """
    Record ``identity`` as the job of ``dst``, or refuse another job's destination, even
    where it holds no output yet: that job may still be starting (there is no lock on an
    object store), and its outputs would join this one's under one record.
    """
    saved = dst.read_text(PREDICT_OPTIONS_NAME)
    if saved is None:  # (check_destination: nothing else is there)
        if dst.create(PREDICT_OPTIONS_NAME, _json_bytes(identity)):
            return
        saved = dst.read_text(PREDICT_OPTIONS_NAME) or ""  # a job started at the same moment
    try:
        before = json.loads(saved)
    except ValueError:
        before = {}
    if not isinstance(before, dict):
        before = {}
    # (a key only the record has: a later d2persist's part of a job's identity, not this one's)
    differ = [k for k in [*identity, *sorted(set(before) - set(identity))]
              if before.get(k) != identity.get(k)]
    if differ:
        k = differ[0]
        what = "the outputs of another job" if _outputs_at(dst) != (set(), set()) else \
            "another job's record, and no output yet"
        raise D2PersistError(
            f"{dst.url} holds {what} ({k} {before.get(k)!r}, this one {identity.get(k)!r}): "
            "predict into another --output, or remove it first.")


class _Job:
    """
    What every image of a job is predicted with, on the driver or in a Ray actor.

    Args:
        failed_before: the names whose error record a run before this one wrote (removed
            when the image is predicted now).
    """

    def __init__(self, dst: Union[str, _Destination], min_score: float, pictures: bool,
                 failed_before: Iterable[str] = ()) -> None:
        self.out = dst if isinstance(dst, _Destination) else _Destination(dst)
        self.min_score = min_score
        self.pictures = pictures
        self.failed_before = frozenset(failed_before)

    def predict(self, predictor: Any, meta: Any, rel: str, shown: str, data: bytes) -> str:
        """
        Predict the image whose file holds ``data`` (``shown``: its path or URL as listed)
        into ``REL.json`` (and ``REL.png``), or its error record. The bytes are decoded as
        the file is read (no temp file). Returns "done" or "failed".
        """
        try:
            check_image_bytes(data, shown)  # its sentence names the image
        except InputImageError as e:
            return self._failed(rel, shown, str(e))
        try:
            pred = predictor(data)
        except InputImageError as e:  # what only decoding finds (a JPEG's truncation)
            return self._failed(rel, shown, f"Image {shown}: {e}")
        if self.pictures:
            self.out.write(rel + ".png", encode_png(pred.draw(meta, min_score=self.min_score)),
                           sync=True)  # there for good before the JSON says done
        self.out.write(rel + ".json", _json_bytes(pred.to_json(image_name=shown,
                                                               min_score=self.min_score)))
        if rel in self.failed_before:  # failed before, read now
            self.out.remove(rel + ".error.json")
        return "done"

    def _failed(self, rel, shown, sentence):
        self.out.write(rel + ".error.json", _json_bytes({"path": shown, "error": sentence}))
        logger.warning("%s", sentence)
        return "failed"

    def read_and_predict(self, predictor: Any, meta: Any, fs: Any, path: str, rel: str,
                         shown: str) -> str:
        """:meth:`predict` of the image at ``path`` on ``fs`` (an fsspec filesystem)."""
        try:
            data = fs.cat_file(path)
        except Exception as e:  # noqa: BLE001 (fsspec backends raise many kinds)
            return self._failed(rel, shown, _read_failure(e, shown))
        return self.predict(predictor, meta, rel, shown, data)


def _read_failure(e: BaseException, shown: str) -> str:
    """The sentence of an image that could not be read (``shown``: as records name it)."""
    if isinstance(e, FileNotFoundError):
        return f"Image {shown} does not exist."
    return f"{shown} could not be read ({type(e).__name__}: {e})."


#: images predicted on this machine between two fsyncs of the output folders
_SYNC_EVERY = 16


def _outputs_at(out: _Destination) -> Tuple[Set[str], Set[str]]:
    """
    The images done at ``out`` (their JSON there, no error record beside it) and those with an
    error record (failed, or stopped between their JSON and the record's removal), listed once.
    """
    try:
        found = out.fs.find(out.root)
    except FileNotFoundError:
        return set(), set()
    except Exception as e:  # noqa: BLE001 (fsspec backends raise many kinds)
        raise OutputPathError(f"Cannot read {out.url} ({type(e).__name__}: {e}).") from None
    root = out.root.rstrip("/") + "/"
    names = {p[len(root):] for p in found if p.startswith(root)}
    names = {n for n in names if n not in (PREDICT_OPTIONS_NAME, PREDICT_JOB_NAME)
             and not posixpath.basename(n).startswith(TEMP_PREFIX)}  # (the job's own files)
    failed = {n[:-len(".error.json")] for n in names if n.endswith(".error.json")}
    return {n[:-len(".json")] for n in names if n.endswith(".json")} - failed, failed


def _leave_out_destination(source: Source, out: _Destination) -> None:
    """
    Drop from ``source`` what lies inside the destination (a destination inside the source
    folder): a rerun would otherwise take the job's own pictures for inputs.
    """
    if type(source.fs) is not type(out.fs):
        return
    inside = out.root.rstrip("/") + "/"
    source.items = [x for x in source.items if not x[0].startswith(inside)]
    source.missing = [x for x in source.missing if not x[0].startswith(inside)]
    if not source.items and not source.missing:
        raise InputImageError(f"{source.url} holds no image outside the destination {out.url}.")


def _check_output_names(source: Source, out: _Destination) -> None:
    """
    Refuse, before anything is predicted, an input whose outputs' names this destination
    cannot hold (a file name of over 255 bytes, usually): its output and its error record
    could not be written, and every run would end at it.
    """
    if not out.local or not (source.items or source.missing):
        return
    try:
        limit = os.pathconf(out.root, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    path, rel = max(source.items + source.missing,
                    key=lambda x: len(posixpath.basename(x[1]).encode("utf-8", "replace")))
    longest = len(posixpath.basename(rel).encode("utf-8", "replace")) + len(".error.json")
    if longest > limit:
        shown = _shown(source, path)
        raise InputImageError(
            f"The outputs of {shown} would have names of {longest} bytes, and {out.url} takes "
            f"at most {limit}: rename the image, or predict into an object store.")


def predict_source(predictor: Any, src: str, dst: str, min_score: float = DEFAULT_MIN_SCORE,
                   pictures: bool = False, progress: bool = False,
                   ray: Optional["RayEngine"] = None) -> Dict[str, Any]:
    """
    Predict every image of ``src`` into ``dst`` (see the module's documentation).

    Args:
        predictor: from :func:`d2persist.load_predictor` (either backend); with ``ray``, one
            or its :class:`~d2persist.predict.load.PredictorSpec`, which gives the job's
            identity (the actors load their own).
        src (str): folder, glob, list file or fsspec URL of the images.
        dst (str): folder or fsspec URL of the outputs.
        min_score (float): instances below this score are left out (as ``infer_single``).
        pictures (bool): also write each prediction's drawing, ``REL.png``.
        progress (bool): show a progress bar (this machine's engine).
        ray (RayEngine): predict on Ray (a local cluster or a running one) instead of here.

    Returns:
        dict: the job record written to ``dst/job.json``: identity, ``src``, ``counts``
        (``inputs``, ``done`` by this run, ``skipped`` as done before, ``failed``), the
        ``engine`` of this run (``{"name": "here"}``, or Ray's address and what each worker
        reserved), versions.

    Raises:
        InputImageError: ``src`` holds no image (outside ``dst``).
        OutputPathError: ``dst`` cannot be written, or holds files no job wrote.
        D2PersistError: ``dst`` holds another job's outputs.
    """
    source = list_source(src)
    out = _Destination(dst)
    check_destination(out)
    _leave_out_destination(source, out)
    _check_output_names(source, out)
    identity = job_identity(predictor, source.url, min_score, pictures)
    _check_same_job(out, identity)
    out.remove(PREDICT_JOB_NAME)  # present only once a run has finished
    out.sync()
    done, failed_before = _outputs_at(out)
    todo = [(p, rel) for p, rel in source.items if rel not in done]
    failed_before &= {rel for _, rel in todo}
    job = _Job(out, min_score, pictures, failed_before)
    inputs = len(source.items) + len(source.missing)
    counts = {"inputs": inputs, "done": 0, "skipped": len(source.items) - len(todo),
              "failed": 0}
    for path, rel in source.missing:  # listed, and not there
        shown = _shown(source, path)
        counts[job._failed(rel, shown, f"Image {shown} does not exist.")] += 1
    engine: Dict[str, Any] = {"name": "here"}
    if ray is not None:
        for status, n in ray.run(source, todo, dst, min_score, pictures, failed_before,
                                 predictor.sha256).items():
            counts[status] += n
        engine = dict(name="ray", address=ray.address or "local", workers=ray.workers)
        engine.update(ray.ran)  # (the address of the Ray it ran on, if it ran actors)
    else:
        meta = predictor.visualizer_metadata() if pictures else None
        items: Iterable[Tuple[str, str]] = todo
        if progress and len(todo) > 1:
            from tqdm import tqdm

            items = tqdm(todo, unit="image")
        try:
            for i, (path, rel) in enumerate(items, 1):
                shown = _shown(source, path)
                counts[job.read_and_predict(predictor, meta, source.fs, path, rel, shown)] += 1
                if i % _SYNC_EVERY == 0:
                    out.sync()
        finally:
            out.sync()  # what is written is done, even where the job stops here
    record = dict(identity, counts=counts, engine=engine,
                  versions=software_versions(imported=("torch", "detectron2", "onnxruntime")),
                  finished=datetime.datetime.now(datetime.timezone.utc).isoformat())
    out.sync()
    out.write(PREDICT_JOB_NAME, _json_bytes(record), sync=True)
    return record


# -- Ray ----------------------------------------------------------------------------------------


#: the status of the images an actor could not predict, having failed to load the predictor
_REFUSED = "refused"


class _RayPredict:
    """
    Ray Data's callable class (``map_batches``): one predictor per actor, loaded once by
    ``load`` with ``threads`` (the bundle downloaded and verified once per node, through the
    cache), its weights those of the job's identity (``sha256``).
    """

    def __init__(self, load: Callable[..., Any], dst: str, base: str, protocol: Optional[str],
                 min_score: float, pictures: bool, threads: int,
                 failed_before: Iterable[str] = (), sha256: Optional[str] = None) -> None:
        self.refused = ""
        self.base = base
        self.protocol = protocol
        try:
            self.predictor = load(threads=threads)
            check_same_weights(self.predictor, sha256, "predict into another --output to "
                               "use the new ones")
        except (D2PersistError, ImportError) as e:  # this node cannot (no GPU, no onnxruntime):
            self.refused = refusal_on_node(e)  # said by each call's rows, which end the job
            return
        self.meta = self.predictor.visualizer_metadata() if pictures else None
        self.job = _Job(dst, min_score, pictures, failed_before)

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        import numpy as np

        rels = [posixpath.relpath(path, self.base) for path in batch["path"]]
        if self.refused:
            return {"status": np.array([_REFUSED] * len(rels)),
                    "detail": np.array([self.refused] * len(rels)), "rel": np.array(rels)}
        statuses = []
        try:
            for data, path, rel in zip(batch["bytes"], batch["path"], rels):
                shown = f"{self.protocol}://{path}" if self.protocol else path
                if self.job.out.exists(rel + ".json"):  # a retry after the write: done once
                    if rel in self.job.failed_before:  # (killed between JSON and removal)
                        self.job.out.remove(rel + ".error.json")
                    statuses.append("skipped")
                else:
                    statuses.append(self.job.predict(self.predictor, self.meta, rel, shown,
                                                     bytes(data)))
            self.job.out.sync()  # each output durable before Ray hears it is done
        except OutputPathError as e:  # the destination refuses: the job ends in its sentence
            return {"status": np.array([_REFUSED] * len(rels)),
                    "detail": np.array([str(e)] * len(rels)), "rel": np.array(rels)}
        return {"status": np.array(statuses), "detail": np.array([""] * len(statuses)),
                "rel": np.array(rels)}


class _StopSignals:
    """
    SIGINT and SIGTERM during a job on Ray. ``ray.init`` installs handlers of its own
    (SIGTERM's, in C++, printed a stack and ended the process without ``ray.shutdown()``);
    :meth:`take` replaces them with one that unwinds the job (``KeyboardInterrupt``) so that
    Ray is shut down; from :meth:`unwind` on (and after the first), signals are only recorded;
    :meth:`restore` puts back the handlers from before ``ray.init`` and, if a SIGTERM came,
    delivers it to them: the process ends as SIGTERM ends it without Ray (exit 143 in a shell,
    also where the kernel ignores it, as for a container's PID 1). A signal ignored before
    stays ignored; outside the main thread nothing is changed.

    Attributes:
        came (list[int]): the stop signals received, in order.
        before (dict[int, Any]): the handler from before of each signal handled.
    """

    def __init__(self) -> None:
        self.came: List[int] = []
        self.unwinding = False
        self.before: Dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handler = signal.getsignal(sig)
                if handler != signal.SIG_IGN:
                    self.before[sig] = handler

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.came.append(signum)
        if not self.unwinding:
            self.unwinding = True
            raise KeyboardInterrupt

    def take(self) -> None:
        """Handle the stop signals (after ``ray.init``)."""
        for sig in self.before:
            signal.signal(sig, self._on_signal)

    def unwind(self) -> None:
        """Only record the stop signals from now on (while Ray is shut down)."""
        self.unwinding = True

    def restore(self) -> None:
        """The handlers from before, and a SIGTERM that came delivered to them."""
        self.unwinding = True
        for sig, handler in self.before.items():
            # None: a handler installed from C, which Python cannot reinstall
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if signal.SIGTERM in self.came:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGTERM)
            raise SystemExit(128 + signal.SIGTERM)  # still here: the kernel ignored it


@dataclass
class RayEngine:
    """
    Predict on Ray: Ray Data reads the images (``read_binary_files``, through the source's
    fsspec filesystem) and ``map_batches`` predicts them in a pool of actors
    (``ActorPoolStrategy``), each loading the predictor once.

    Attributes:
        load: a picklable callable returning a predictor (e.g. a ``functools.partial`` of
            :func:`d2persist.load_predictor`), called once in each actor with ``threads``, as
            many as the actor's CPUs.
        address (str or None): a running cluster's address ("auto": the one this machine
            belongs to); None starts a local one for the job.
        workers (int): actors.
        cpus_per_worker (float or None): CPUs each actor reserves; None: the cluster's share
            (:func:`~d2persist.scale.ray_nodes.cpus_per_copy`).
        gpus_per_worker (float): GPUs each actor reserves (PyTorch on GPUs).
        batch_size (int): images per call of an actor (each still predicted and written on
            its own): fewer calls, less of Ray's per-call cost; a retry redoes at most one.
        ran (dict): where the last :meth:`run` ran its actors (``address``: as given, else
            the cluster's GCS address; "local" for a Ray started for it) and what each reserved
            (``cpus_per_worker``, ``gpus_per_worker``); empty where it ran none.
    """

    load: Callable[..., Any]
    address: Optional[str] = None
    workers: int = 1
    cpus_per_worker: Optional[float] = None
    gpus_per_worker: float = 0.0
    batch_size: int = 8
    ran: Dict[str, Any] = field(default_factory=dict, init=False)

    def run(self, source: Source, todo: List[Tuple[str, str]], dst: str, min_score: float,
            pictures: bool, failed_before: Iterable[str] = (), sha256: Optional[str] = None
            ) -> Dict[str, int]:
        """
        Predict ``todo`` (``(path, rel)`` of ``source``; ``failed_before``: the names of
        those whose error record an earlier run wrote); the count of each status. ``sha256``:
        the weights of the job's identity; an actor that loads others ends the job (the
        artifacts changed since they were described).
        """
        import ray

        self.ran = {}
        if not todo:
            return {}
        if ray.is_initialized():  # the caller's Ray, and its signal handling
            return self._run(ray, source, todo, dst, min_score, pictures, failed_before, False,
                             sha256)
        stops = _StopSignals()  # Python's handlers, before ray.init installs Ray's
        try:
            # "local": a Ray of its own, not the one RAY_ADDRESS or the last `ray start` names
            ray.init(address=self.address or "local", include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
            stops.take()
            return self._run(ray, source, todo, dst, min_score, pictures, failed_before,
                             self.address is None, sha256)
        finally:
            stops.unwind()
            try:
                ray.shutdown()
            finally:
                stops.restore()

    def _run(self, ray, source, todo, dst, min_score, pictures, failed_before, started,
             sha256):
        cpus = self.cpus_per_worker or cpus_per_copy(ray, self.workers)
        check_ray_nodes(ray, "A worker", cpus, self.gpus_per_worker, started=started,
                        copies=self.workers)
        address = "local" if started else self.address if self.address not in (None, "auto") \
            else ray.get_runtime_context().gcs_address  # (the caller's Ray, or "auto"'s)
        self.ran = {"address": address, "cpus_per_worker": cpus,
                    "gpus_per_worker": self.gpus_per_worker}
        filesystem, protocol = None, None
        if not source.local:
            from pyarrow.fs import FSSpecHandler, PyFileSystem

            filesystem = PyFileSystem(FSSpecHandler(source.fs))
            protocol = source.fs.protocol if isinstance(source.fs.protocol, str) else \
                source.fs.protocol[0]
        counts: Dict[str, int] = {}
        for _ in range(_READ_PASSES):
            seen: Set[str] = set()
            try:
                self._pass(ray, filesystem, protocol, source.base, todo, dst, min_score,
                           pictures, failed_before, sha256, cpus, counts, seen)
                failure = None
            except D2PersistError:
                raise
            except Exception as e:  # noqa: BLE001 (Ray's errors wrap the reader's)
                failure = e
            todo = _after_pass(source, todo, seen, dst, failed_before, counts,
                               min_score, pictures, failure)
            if not todo:
                return counts
        raise D2PersistError(  # (each pass ends unreadable inputs, so only a file that comes
            f"Ray Data could not read {len(todo)} image(s) of {source.url} that this machine "
            f"reads, such as {todo[0][0]}: run the same command again.")  # and goes)

    def _pass(self, ray, filesystem, protocol, base, todo, dst, min_score, pictures,
              failed_before, sha256, cpus, counts, seen):
        """One Ray Data job over ``todo``: ``counts`` each status, ``seen`` each name."""
        paths = [p for p, _ in todo]
        # reading is I/O: it reserves no CPU, which the actors hold (actors x threads = cores)
        ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=filesystem,
                                        override_num_blocks=min(len(paths), 4 * self.workers),
                                        num_cpus=0)
        ds = ds.map_batches(
            _RayPredict, batch_size=self.batch_size,
            fn_constructor_args=(self.load, dst, base, protocol, min_score, pictures,
                                 max(1, int(cpus)), sorted(failed_before), sha256),
            compute=ray.data.ActorPoolStrategy(size=self.workers),
            num_cpus=cpus, num_gpus=self.gpus_per_worker or None)
        for row in ds.iter_rows():
            if row["status"] == _REFUSED:  # nothing written for it: a rerun predicts it
                raise D2PersistError(str(row["detail"]))
            status = "done" if row["status"] == "skipped" else str(row["status"])
            counts[status] = counts.get(status, 0) + 1
            seen.add(str(row["rel"]))


#: Ray Data jobs one ``RayEngine.run`` may take: each after the first predicts only what the
#: one before could not read (an image removed, or refused to Ray's reader)
_READ_PASSES = 3


def _read_problem(fs: Any, path: str, shown: str) -> Optional[str]:
    """Why the image at ``path`` cannot be read here (one sentence), or None."""
    try:
        with fs.open(path, "rb") as f:
            f.read(1)
    except Exception as e:  # noqa: BLE001 (fsspec backends raise many kinds)
        return _read_failure(e, shown)
    return None


def _after_pass(source: Source, todo: List[Tuple[str, str]], seen: Set[str], dst: str,
                failed_before: Iterable[str], counts: Dict[str, int], min_score: float,
                pictures: bool, failure: Optional[BaseException]) -> List[Tuple[str, str]]:
    """
    After a Ray Data job: what it left without a row (``todo`` whose name is not in ``seen``; Ray
    Data ends a job whose reader fails on one file, and passes over a file removed since it
    was listed). Each one with its output at ``dst`` now is counted; one this machine cannot
    read gets its error record here; the rest is returned, for another job. A ``failure``
    that left nothing unreadable is raised again (not an input's).
    """
    left = [(p, rel) for p, rel in todo if rel not in seen]
    if not left:
        return []
    out = _Destination(dst, make=False)
    done, failed = _outputs_at(out)
    failed -= set(failed_before)  # (a record of before: not known to be this job's)
    job = _Job(out, min_score, pictures)
    unknown = [(p, rel) for p, rel in left if rel not in done and rel not in failed]
    # the images the failure names (Ray's reader says which file), else all of those left,
    # asked concurrently (a failure not of a read: each one is read, once)
    named = [(p, rel) for p, rel in unknown if failure is not None and p in str(failure)]
    with ThreadPoolExecutor(16) as pool:
        asked = named or unknown
        problems = dict(zip([rel for _, rel in asked], pool.map(
            lambda x: _read_problem(source.fs, x[0], _shown(source, x[0])), asked)))
    rest, unreadable = [], 0
    for path, rel in left:
        status = "done" if rel in done else "failed" if rel in failed else None
        shown = _shown(source, path)
        problem = None if status else problems.get(rel)
        if problem is not None:
            job._failed(rel, shown, problem)
            status, unreadable = "failed", unreadable + 1
        if status is None:
            rest.append((path, rel))
        else:  # (else: written by an actor whose row never came)
            counts[status] = counts.get(status, 0) + 1
    out.sync()
    if failure is not None and not unreadable:
        raise failure
    if failure is not None:
        logger.warning("Ray Data's job ended on %d image(s) it could not read (%s: %s); "
                       "they have error records, the other %d are predicted again.",
                       unreadable, type(failure).__name__,
                       str(failure).splitlines()[0][:200] if str(failure) else "", len(rest))
    return rest
