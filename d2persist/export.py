"""
The inference bundle: everything a predicting process needs, and nothing it must not run.

An export folder holds ``model.safetensors`` (weights only), ``config.yaml`` (paths relative to
the bundle) and ``manifest.json``: dataset metadata, the input contract, versions, and the
sha256 and size of every other file. The manifest is written last; a folder without it is an
incomplete bundle.
"""

import logging
import os
from typing import Optional, Sequence

import torch

from .errors import ArtifactError
from .fileio import (
    fsync_dir,
    read_json,
    remove_temp_files,
    resolve_inside,
    sha256_file,
    write_bytes,
    write_json,
)
from .layout import CONFIG_NAME, MANIFEST_NAME, WEIGHTS_NAME

__all__ = ["FORMAT", "write_export", "read_manifest", "dataset_metadata", "metadata_from_json"]

logger = logging.getLogger(__name__)

#: Identifies a d2persist manifest, with its version.
FORMAT = {"name": "d2persist-export", "version": 1}


def _json_safe(value):
    """``value`` as JSON data, or raise TypeError."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    raise TypeError(type(value).__name__)


def metadata_from_json(meta: dict) -> dict:
    """Undo JSON's stringification of integer keys in ``*_id_to_contiguous_id`` maps."""
    out = dict(meta)
    for key, value in meta.items():
        if key.endswith("_id_to_contiguous_id") and isinstance(value, dict):
            out[key] = {int(k) if str(k).lstrip("-").isdigit() else k: v for k, v in value.items()}
    return out


def dataset_metadata(dataset_names: Sequence[str]) -> dict:
    """
    What ``MetadataCatalog`` holds for the first training dataset, as JSON data.

    Entries that are not JSON data (functions, objects) are left out with a warning. Dict keys
    become strings; :func:`metadata_from_json` turns integer-like keys of
    ``*_id_to_contiguous_id`` maps back into ints.
    """
    from detectron2.data import MetadataCatalog

    if not dataset_names:
        return {}
    meta = MetadataCatalog.get(dataset_names[0]).as_dict()
    out = {}
    for key, value in meta.items():
        try:
            out[key] = _json_safe(value)
        except TypeError as e:
            logger.warning("Metadata %r of %s is not JSON data (%s): not exported.",
                           key, dataset_names[0], e)
    return out


def _versions():
    import detectron2

    from . import __version__

    return {"d2persist": __version__, "detectron2": detectron2.__version__,
            "torch": torch.__version__}


def _weights_bytes(model):
    from safetensors.torch import save

    state = {}
    seen = {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        t = v.detach().to("cpu").contiguous()
        state[k] = t.clone() if key in seen else t  # safetensors refuses shared storage
        seen[key] = k
    return save(state, metadata={"format": "pt"})


def write_export(run, model, export_dir: str, iteration: int,
                 metadata: Optional[dict] = None) -> dict:
    """
    Write the inference bundle of ``model`` to ``export_dir``, manifest last.

    Args:
        run (RunConfig): the run's config (:func:`d2persist.runconfig.run_config`).
        model (nn.Module): the trained model (not DDP-wrapped).
        export_dir (str): the bundle folder; created if needed.
        iteration (int): the training iteration the weights are from.
        metadata (dict): dataset metadata; from ``MetadataCatalog`` if None.

    Returns:
        dict: the manifest.
    """
    os.makedirs(export_dir, exist_ok=True)
    remove_temp_files(export_dir)
    manifest_path = os.path.join(export_dir, MANIFEST_NAME)
    if os.path.exists(manifest_path):  # the old bundle stops being complete first
        os.unlink(manifest_path)
        fsync_dir(export_dir)
    files = {}
    for name, data in (
        (WEIGHTS_NAME, _weights_bytes(model)),
        (CONFIG_NAME, run.export_config_text(WEIGHTS_NAME).encode("utf-8")),
    ):
        digest = write_bytes(os.path.join(export_dir, name), data)
        files[name] = {"sha256": digest, "size": len(data)}
    if metadata is None:
        metadata = dataset_metadata(run.train_dataset_names())
    manifest = {
        "format": FORMAT,
        "config": CONFIG_NAME,
        "config_kind": run.kind,
        "config_extensions": list(run.options["CONFIG_EXTENSIONS"]),
        "weights": WEIGHTS_NAME,
        "iteration": int(iteration),
        "metadata": metadata,
        "input": run.input_contract(),
        "versions": _versions(),
        "files": files,
    }
    write_json(manifest_path, manifest)
    logger.info("Exported an inference bundle to %s", export_dir)
    return manifest


def read_manifest(export_dir: str, verify: bool = True) -> dict:
    """
    Read and check a bundle's manifest.

    Args:
        export_dir (str): the bundle folder.
        verify (bool): check every listed file's size and sha256.

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
    fmt = manifest.get("format", {}) if isinstance(manifest, dict) else {}
    if fmt.get("name") != FORMAT["name"] or fmt.get("version", 0) > FORMAT["version"]:
        raise ArtifactError(f"{path} is not a d2persist manifest this version can read.")
    files = manifest.get("files")
    if not isinstance(files, dict) or not {manifest.get("config"), manifest.get("weights")} <= set(
        files
    ):
        raise ArtifactError(f"{path} does not list the bundle's config and weights files.")
    for name, entry in files.items():
        file_path = resolve_inside(export_dir, name)
        if not verify:
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
