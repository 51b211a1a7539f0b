"""
The export bundle's manifest, read side: what a predicting process checks before it trusts a
bundle. Needs neither torch nor detectron2 (the ONNX Runtime predictor uses it).
"""

import os

from .errors import ArtifactError
from .fileio import read_json, resolve_inside, safe_yaml_load, sha256_file
from .layout import DEFAULT_EXPORT_DIR, MANIFEST_NAME, ONNX_INT8_NAME, ONNX_NAME, PERSIST_FILE

__all__ = ["FORMAT", "LOADED", "EVAL_BACKENDS", "EVAL_TOLERANCE", "EVAL_CHECKED", "read_manifest",
           "metadata_from_json", "persist_options_of_run", "find_bundle", "describe_source",
           "evaluation_problem", "export_backends", "local_bundle", "cache_root"]

#: Identifies a d2persist manifest, with its version.
FORMAT = {"name": "d2persist-export", "version": 1}

#: The backends a bundle's ``evaluation`` entry measures, as they are named there.
EVAL_BACKENDS = ("pytorch", "onnxruntime", "onnxruntime-int8")
#: How far (in AP points) each backend may be from the in-training evaluation: the PyTorch
#: bundle *is* the evaluation path; ONNX Runtime computes the same graph in another order (every
#: metric); INT8 is allowed what quantization is asked to cost at most (see EVAL_CHECKED).
EVAL_TOLERANCE = {"pytorch": 0.0, "onnxruntime": 0.1, "onnxruntime-int8": 1.0}
#: The metrics the tolerance applies to, by the end of their name (every one if not listed):
#: INT8's box and mask AP; its per-category APs on a small test set move more, and are recorded.
EVAL_CHECKED = {"onnxruntime-int8": ("/AP",)}


def metadata_from_json(meta: dict) -> dict:
    """Undo JSON's stringification of integer keys in ``*_id_to_contiguous_id`` maps."""
    out = dict(meta)
    for key, value in meta.items():
        if key.endswith("_id_to_contiguous_id") and isinstance(value, dict):
            out[key] = {int(k) if str(k).lstrip("-").isdigit() else k: v for k, v in value.items()}
    return out


#: ``read_manifest(only=LOADED)``: check just the config and weights files the bundle names.
LOADED = "config and weights"


def read_manifest(export_dir: str, verify: bool = True, only=None) -> dict:
    """
    Read and check a bundle's manifest.

    Args:
        export_dir (str): the bundle folder.
        verify (bool): check every listed file's size and sha256.
        only (list[str] or LOADED): check only these of the listed files (the ones a caller
            loads); :data:`LOADED` names the manifest's config and weights files.

    Returns:
        dict: the manifest.

    Raises:
        ArtifactError: no manifest, an unknown format, or a file that does not match.
        UnsafeArtifactError: a file name that points outside the bundle.
    """
    path = os.path.join(export_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise ArtifactError(f"{export_dir} is not a complete export: it has no {MANIFEST_NAME}.")
    manifest = read_json(path)
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    version = fmt.get("version") if isinstance(fmt, dict) else None
    if (not isinstance(version, int) or fmt.get("name") != FORMAT["name"]
            or version > FORMAT["version"] or not isinstance(manifest.get("input"), dict)):
        raise ArtifactError(f"{path} is not a d2persist manifest this version can read.")
    files = manifest.get("files")
    named = [manifest.get("config"), manifest.get("weights")]
    if not isinstance(files, dict) or not all(
        isinstance(n, str) and isinstance(files.get(n), dict) for n in named
    ) or not all(isinstance(e, dict) for e in files.values()):
        raise ArtifactError(f"{path} does not list the bundle's config and weights files.")
    if only == LOADED:
        only = named
    for name, entry in files.items():
        file_path = resolve_inside(export_dir, name)
        if not verify or (only is not None and name not in only):
            continue
        if not os.path.isfile(file_path):
            raise ArtifactError(f"Bundle file {file_path} named in {MANIFEST_NAME} is missing.")
        size = os.path.getsize(file_path)
        if size != entry.get("size"):
            raise ArtifactError(
                f"Bundle file {file_path} has {size} bytes, the manifest says {entry.get('size')}."
            )
        if sha256_file(file_path) != entry.get("sha256"):
            raise ArtifactError(
                f"Bundle file {file_path} does not match its sha256 in the manifest."
            )
    return manifest


def persist_options_of_run(folder: str) -> dict:
    """A yacs run's ``persist.yaml`` options ({} if it has none)."""
    path = os.path.join(folder, PERSIST_FILE)
    if not os.path.isfile(path):
        return {}
    persist = safe_yaml_load(path)
    options = persist.get("PERSIST") if isinstance(persist, dict) else None
    if not isinstance(options, dict):
        raise ArtifactError(f"{path} holds no PERSIST options.")
    return options


def find_bundle(path: str):
    """
    The export bundle at ``path``: ``path`` itself if it holds a manifest, else the export
    folder of the run folder ``path`` if that holds one, else None.
    """
    if os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        return path
    name = persist_options_of_run(path).get("EXPORT_DIR", DEFAULT_EXPORT_DIR)
    export_dir = resolve_inside(path, name)
    return export_dir if os.path.isfile(os.path.join(export_dir, MANIFEST_NAME)) else None


def describe_source(source: dict) -> str:
    """
    One line saying which weights a predictor uses, from a manifest's ``source`` (or the
    ``{"from": "checkpoint", "file", "iteration"}`` of a run folder's checkpoint).
    """
    source = source or {}
    it = source.get("iteration")
    at = f"iteration {it}" if it is not None else "iteration unknown"
    kind = source.get("from")
    if kind == "best":
        return (f"the best weights by {source.get('metric')} ({source.get('mode')}): "
                f"{source.get('value')} at {at}")
    if kind == "checkpoint":
        return f"checkpoint {source.get('file')}, {at}"
    return f"the final weights, {at}"


def export_backends(manifest: dict):
    """The :data:`EVAL_BACKENDS` a bundle holds a model for, by its manifest."""
    files = manifest.get("files") or {}
    found = ["pytorch"]
    if ONNX_NAME in files:
        found.append("onnxruntime")
    if ONNX_INT8_NAME in files:
        found.append("onnxruntime-int8")
    return found


def evaluation_problem(manifest: dict, backend: str):
    """
    The sentence to log when a predictor loads ``backend`` of a bundle whose evaluation
    recorded it as failed (see :func:`d2persist.bundle_eval.evaluate_bundle`), else None.
    """
    entry = manifest.get("evaluation") if isinstance(manifest, dict) else None
    if not isinstance(entry, dict) or backend not in (entry.get("failed") or []):
        return None
    why = (entry.get("errors") or {}).get(backend, "no reason recorded")
    return (f"This bundle's {backend} backend failed its evaluation on {entry.get('dataset')} "
            f"when it was exported ({why}): its predictions may differ from what training "
            "evaluated.")


def cache_root() -> str:
    """d2persist's cache folder: ``$D2PERSIST_CACHE``, else ``~/.cache/d2persist``."""
    return os.environ.get("D2PERSIST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "d2persist"
    )


def local_bundle(path: str) -> str:
    """
    A local folder to predict from: ``path`` itself, or for an fsspec URL (``s3://.../export``,
    or a mirrored run whose ``export/`` is complete) the bundle downloaded into the cache
    (``$D2PERSIST_CACHE/bundles``), manifest last, and verified against the manifest.

    Raises:
        ArtifactError: nothing at the URL holds a manifest, a download fails, or a file does
            not match the manifest.
    """
    import hashlib
    import json

    from .fileio import write_text
    from .storage import Mirror, is_url

    if not is_url(path):
        return path
    url = path.rstrip("/")
    try:
        for candidate in (url, f"{url}/{DEFAULT_EXPORT_DIR}"):
            mirror = Mirror(candidate)
            text = mirror.read_text(MANIFEST_NAME)
            if text is not None:
                break
        else:
            raise ArtifactError(f"{url} holds no export bundle ({MANIFEST_NAME}).")
        manifest = json.loads(text)
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict):
            raise ArtifactError(f"{candidate}/{MANIFEST_NAME} lists no files.")
        cache = os.path.join(cache_root(), "bundles",
                             hashlib.sha256(candidate.encode()).hexdigest()[:16])
        os.makedirs(cache, exist_ok=True)
        stale = os.path.join(cache, MANIFEST_NAME)
        if os.path.exists(stale):  # the cached bundle stops being complete first
            os.unlink(stale)
        for name, entry in files.items():
            local = resolve_inside(cache, name)
            if not (os.path.isfile(local) and isinstance(entry, dict)
                    and sha256_file(local) == entry.get("sha256")):
                mirror.get(name, local)
    except (ValueError, OSError) as e:
        raise ArtifactError(f"Cannot download the bundle at {url} ({type(e).__name__}: {e}).") \
            from None
    write_text(os.path.join(cache, MANIFEST_NAME), text)
    read_manifest(cache)  # every file against its sha256
    return cache
