"""
The export bundle's manifest, read side: what a predicting process checks before it trusts a
bundle. Needs neither torch nor detectron2 (the ONNX Runtime predictor uses it).
"""

import contextlib
import logging
import os
import shutil
import tempfile
from typing import Any, Iterator, List, Optional, Tuple

from ..errors import ArtifactError, D2PersistError
from ..files.atomic import folder_mode, fsync_dir, resolve_inside, sha256_file, write_bytes
from ..files.cache import discard, note_used, remove_unused
from ..layout import (
    MANIFEST_NAME,
    MODEL_FILES,
    ONNX,
    ONNX_INT8,
    PYTORCH,
    TEMP_PREFIX,
    cache_root,
)
from .bundle import read_manifest

__all__ = ["EVAL_TOLERANCE", "EVAL_CHECKED", "metadata_from_json", "describe_source",
           "evaluation_problem", "export_backends", "bundle_source", "local_bundle",
           "remote_manifest"]

logger = logging.getLogger(__name__)

#: How far (in AP points) each backend may be from the in-training evaluation: the PyTorch
#: bundle *is* the evaluation path; ONNX Runtime computes the same graph in another order (every
#: metric); INT8 is allowed what quantization is asked to cost at most (see EVAL_CHECKED).
EVAL_TOLERANCE = {PYTORCH.backend: 0.0, ONNX.backend: 0.1, ONNX_INT8.backend: 1.0}
#: The metrics the tolerance applies to, by the end of their name (every one if not listed):
#: INT8's headline metric of each family (box, mask and keypoint AP, PQ, mIoU); its per-category
#: APs on a small test set move more, and are recorded.
EVAL_CHECKED = {ONNX_INT8.backend: ("/AP", "/PQ", "/mIoU")}


def metadata_from_json(meta: dict) -> dict:
    """Undo JSON's stringification of integer keys in ``*_id_to_contiguous_id`` maps."""
    out = dict(meta)
    for key, value in meta.items():
        if key.endswith("_id_to_contiguous_id") and isinstance(value, dict):
            out[key] = {int(k) if str(k).lstrip("-").isdigit() else k: v for k, v in value.items()}
    return out


def describe_source(source: dict) -> str:
    """
    One line saying which weights a predictor uses, from a manifest's ``source`` (or the
    ``{"from": "checkpoint", "file", "iteration"}`` of a run folder's checkpoint).
    """
    source = source or {}
    it = source.get("iteration")
    at = f"iteration {it}" if it is not None else "iteration unknown"
    kind = source.get("from")
    ema = source.get("weights") == "ema"
    if ema:  # PERSIST.EMA_DECAY with EMA_EVAL: the average, which the run evaluated
        decay = (source.get("ema") or {}).get("decay")
        at += f", EMA weights (decay {decay})" if decay is not None else ", EMA weights"
    if kind == "best":
        return (f"the best {'EMA ' if ema else ''}weights by {source.get('metric')} "
                f"({source.get('mode')}): {source.get('value')} at {at}")
    if kind == "checkpoint":
        return f"checkpoint {source.get('file')}, {at}"
    return f"the final weights, {at}"


def bundle_source(manifest: dict) -> dict:
    """Which weights a bundle holds, as its manifest records them (for :func:`describe_source`)."""
    return manifest.get("source") or {"from": "final", "iteration": manifest.get("iteration")}


def export_backends(manifest: dict) -> List[str]:
    """The :data:`EVAL_BACKENDS` a bundle holds a model for, by its manifest."""
    files = manifest.get("files") or {}
    return [m.backend for m in MODEL_FILES if m is PYTORCH or m.file in files]


def evaluation_problem(manifest: dict, backend: str) -> Optional[str]:
    """
    The sentence to log when a predictor loads ``backend`` of a bundle whose evaluation
    recorded it as failed (see :func:`d2persist.export.self_eval.evaluate_bundle`), else None.
    """
    entry = manifest.get("evaluation") if isinstance(manifest, dict) else None
    if not isinstance(entry, dict) or backend not in (entry.get("failed") or []):
        return None
    why = (entry.get("errors") or {}).get(backend, "no reason recorded")
    return (f"This bundle's {backend} backend failed its evaluation on {entry.get('dataset')} "
            f"when it was exported ({why}): its predictions may differ from what training "
            "evaluated.")


@contextlib.contextmanager
def _reading_bundle(url: str) -> Iterator[None]:
    """What goes wrong reading the bundle at ``url``, as an :class:`ArtifactError`."""
    try:
        yield
    except ArtifactError:
        raise
    except D2PersistError as e:
        raise ArtifactError(str(e)) from None
    except (ValueError, OSError) as e:
        raise ArtifactError(f"Cannot read the bundle at {url} ({type(e).__name__}: {e}).") \
            from None


def _remote_bundle(url: str) -> Tuple[str, Any, bytes, dict]:
    """
    ``(bundle URL, its view, the manifest's bytes, the manifest)`` of the complete bundle at
    ``url`` (a bundle, or a mirrored run whose export is complete); nothing else read.
    """
    from .view import open_view

    view = open_view(url)
    bundle_url = view.export_dir()
    export = view.export() or {}
    if bundle_url is None or export.get("complete") is not True:
        why = f": {export['problem']}" if export.get("problem") else "."
        raise ArtifactError(f"{url} holds no complete export bundle ({MANIFEST_NAME}){why}")
    bundle = open_view(bundle_url)
    text = bundle.read(MANIFEST_NAME)  # checked by manifest(), and written as these bytes
    manifest = bundle.manifest()
    assert text is not None  # manifest() parsed the manifest: it is there
    return bundle_url, bundle, text, manifest


def remote_manifest(url: str) -> Tuple[str, dict]:
    """
    ``(bundle URL, manifest)`` of the complete bundle at the fsspec URL ``url`` (as
    :func:`local_bundle` takes), format checked, each of its files with a sha256 and there
    at the size the manifest gives; none downloaded or hashed (a Ray job's driver describes
    what its nodes download and verify).

    Raises:
        ArtifactError: nothing at the URL holds a complete bundle, a file has no sha256, is
            missing or of another size, or it cannot be read.
    """
    url = url.rstrip("/")
    with _reading_bundle(url):
        bundle_url, bundle, _, manifest = _remote_bundle(url)
        problems = bundle.unhashed_problems(manifest)
        if problems:
            raise ArtifactError(problems[0].sentence)
        return bundle_url, manifest


def local_bundle(path: str) -> str:
    """
    A local folder to predict from: ``path`` itself, or for an fsspec URL (``s3://.../export``,
    or a mirrored run whose export is complete) the bundle downloaded into the cache
    (``$D2PERSIST_CACHE/bundles``) and verified. Each version of a bundle (its manifest's
    bytes, which give every file's sha256) has a folder of its own there, made whole in a
    temporary folder and renamed into place once every file matches: a cached folder is
    complete and never changes, so processes that load one bundle at once (replicas, actors)
    neither see a partial one nor undo each other's; files of the version cached before are
    reused, not downloaded again. The URL's other versions, and other URLs' bundles, that no
    process used for a week are removed (:mod:`d2persist.files.cache`).

    Raises:
        ArtifactError: nothing at the URL holds a manifest, a file there is missing, of
            another size or without a sha256, a download fails or does not match the
            manifest (named by its URL), or the cache cannot be written.
    """
    import hashlib

    from ..files.mirror import is_url

    if not is_url(path):
        return path
    url = path.rstrip("/")
    with _reading_bundle(url):
        bundle_url, bundle, text, manifest = _remote_bundle(url)
        problems = bundle.unhashed_problems(manifest)  # before anything is downloaded
        if problems:
            raise ArtifactError(problems[0].sentence)
    versions = os.path.join(cache_root(), "bundles",
                            hashlib.sha256(bundle_url.encode()).hexdigest()[:16])
    final = os.path.join(versions, hashlib.sha256(text).hexdigest()[:16])
    note_used(versions)  # (first: a process cleaning the cache now leaves these alone)
    if os.path.isfile(os.path.join(final, MANIFEST_NAME)):
        note_used(final)
        try:
            read_manifest(final)  # (what is cached is checked each time, as the model is loaded)
            _remove_unused(versions, final)
            return final
        except ArtifactError as e:  # damaged since (or removed meanwhile): made again
            logger.warning("%s; downloading %s again.", e, bundle_url)
            discard(final)
    try:
        os.makedirs(versions, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=versions)
        os.chmod(tmp, folder_mode())  # (mkdtemp's is 0700: a cache other users share)
    except OSError as e:
        raise _cache_error(versions, e) from None
    try:
        for name, entry in manifest["files"].items():
            local = resolve_inside(tmp, name)
            try:
                os.makedirs(os.path.dirname(local), exist_ok=True)
                reused = _reuse_cached(versions, name, entry, local)
            except OSError as e:
                raise _cache_error(versions, e) from None
            with _writing_cache(versions):
                if reused and sha256_file(local) != entry["sha256"]:  # damaged in the cache
                    os.unlink(local)
                    reused = False
            if not reused:
                with _reading_bundle(url), _writing_cache(versions):
                    bundle.download(name, local)
                with _writing_cache(versions):
                    got = sha256_file(local)
                if got != entry["sha256"]:
                    raise ArtifactError(f"{bundle_url}/{name} does not match its manifest "
                                        "entry (sha256): the bundle there is damaged.")
        try:
            write_bytes(os.path.join(tmp, MANIFEST_NAME), text)
            os.rename(tmp, final)  # whole, or not at all
            fsync_dir(versions)
        except OSError as e:
            if not os.path.isfile(os.path.join(final, MANIFEST_NAME)):
                raise _cache_error(versions, e) from None
            # another process cached the same version first: it is the same bytes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    note_used(final)
    _remove_unused(versions, final)
    return final


def _remove_unused(versions: str, final: str) -> None:
    """
    The cache kept bounded as ``final`` is loaded: the other versions of its URL, and other
    URLs' bundles, that no process used for a week; stale temporary folders.
    """
    remove_unused(versions, keep=[os.path.basename(final)])
    remove_unused(os.path.dirname(versions), keep=[os.path.basename(versions)])


@contextlib.contextmanager
def _writing_cache(versions: str) -> Iterator[None]:
    """
    An error of the cache's disk while a file is downloaded into it (full, read-only, not
    this user's) as :func:`_cache_error`, not blamed on the bundle's URL.
    """
    import errno

    try:
        yield
    except OSError as e:
        mine = bool(e.filename) and os.path.abspath(str(e.filename)).startswith(
            os.path.abspath(versions) + os.sep)
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) or (
                mine and e.errno in (errno.EACCES, errno.EPERM)):
            raise _cache_error(versions, e) from None
        raise


def _cache_error(versions: str, e: OSError) -> ArtifactError:
    return ArtifactError(f"Cannot write the bundle cache in {versions} ({e}); set "
                         "D2PERSIST_CACHE to a folder this process can write, with room.")


def _reuse_cached(versions: str, name: str, entry: dict, local: str) -> bool:
    """
    Link (or copy) into ``local`` the file ``name`` of a version cached before whose manifest
    gives it the sha256 of ``entry``; whether one did (the caller hashes what it got).
    """
    import json

    try:
        cached = sorted(d for d in os.listdir(versions) if not d.startswith(TEMP_PREFIX))
    except OSError:
        return False
    for version in cached:
        old = os.path.join(versions, version, name)
        try:
            with open(os.path.join(versions, version, MANIFEST_NAME), "rb") as f:
                their = (json.loads(f.read()).get("files") or {}).get(name) or {}
        except (OSError, ValueError, AttributeError):
            continue  # not a cached version (the layout before versions, or being set aside)
        if their.get("sha256") != entry["sha256"] or not os.path.isfile(old):
            continue
        try:
            os.link(old, local)
        except OSError:
            try:
                shutil.copyfile(old, local)
            except OSError:  # (removed meanwhile, as unused)
                continue
        return True
    return False
