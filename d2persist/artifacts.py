"""
Resolve what a user points prediction at: an export bundle, or a run's output folder.

A run folder is predicted from through its export when that export is complete; otherwise
(interrupted, or still training) through its newest checkpoint that verifies and its
``config.yaml``. Nothing here imports training code.
"""

import os
from dataclasses import dataclass, field
from typing import Optional

from .checkpoint_files import find_newest_valid, list_checkpoints
from .errors import ArtifactError
from .export import MANIFEST_NAME, read_manifest
from .fileio import read_json, resolve_inside, safe_yaml_load
from .runconfig import PERSIST_FILE

__all__ = ["Artifacts", "resolve_artifacts", "METADATA_NAME", "metadata_from_json"]

#: Dataset metadata a run folder holds from its first iteration on.
METADATA_NAME = "metadata.json"
_RUN_CONFIG = "config.yaml"
_DEFAULT_EXPORT_DIR = "export"


@dataclass
class Artifacts:
    """
    Where the pieces of a model are.

    Attributes:
        kind (str): "export" or "checkpoint".
        root (str): the folder they were found in.
        config (dict): the config as read by a safe YAML loader.
        config_kind (str): "yacs" or "lazy".
        weights_path (str): a ``.safetensors`` or ``.pth`` file.
        metadata (dict): dataset metadata (``thing_classes``, ...); may be empty.
        iteration (int or None): the training iteration of the weights, if known.
    """

    kind: str
    root: str
    config: dict = field(repr=False)
    config_kind: str
    weights_path: str
    metadata: dict = field(repr=False)
    iteration: Optional[int] = None


def metadata_from_json(meta):
    """Undo JSON's stringification of integer keys in ``*_id_to_contiguous_id`` maps."""
    out = dict(meta)
    for key, value in meta.items():
        if key.endswith("_id_to_contiguous_id") and isinstance(value, dict):
            out[key] = {int(k) if str(k).lstrip("-").isdigit() else k: v for k, v in value.items()}
    return out


def _config_kind(config, path):
    if not isinstance(config, dict):
        raise ArtifactError(f"{path} does not hold a config mapping.")
    if "MODEL" in config:
        return "yacs"
    if "model" in config:
        return "lazy"
    raise ArtifactError(f"{path} is neither a detectron2 config nor a LazyConfig.")


def _from_export(folder):
    manifest = read_manifest(folder)
    config_path = resolve_inside(folder, manifest["config"])
    config = safe_yaml_load(config_path)
    return Artifacts(
        "export",
        folder,
        config,
        manifest.get("config_kind") or _config_kind(config, config_path),
        resolve_inside(folder, manifest["weights"]),
        metadata_from_json(manifest.get("metadata") or {}),
        manifest.get("iteration"),
    )


def _export_dir_of_run(folder):
    try:
        persist = safe_yaml_load(os.path.join(folder, PERSIST_FILE)) or {}
        name = persist.get("PERSIST", {}).get("EXPORT_DIR", _DEFAULT_EXPORT_DIR)
    except ArtifactError:
        name = _DEFAULT_EXPORT_DIR
    return resolve_inside(folder, name)


def _from_checkpoint(folder):
    config_path = os.path.join(folder, _RUN_CONFIG)
    if not os.path.isfile(config_path):
        raise ArtifactError(f"{folder} has checkpoints but no {_RUN_CONFIG} to rebuild the model.")
    weights = find_newest_valid(folder)
    if weights is None:
        raise ArtifactError(f"No checkpoint in {folder} verifies (all are truncated or corrupt).")
    config = safe_yaml_load(config_path)
    meta_path = os.path.join(folder, METADATA_NAME)
    metadata = read_json(meta_path) if os.path.isfile(meta_path) else {}
    return Artifacts(
        "checkpoint", folder, config, _config_kind(config, config_path), weights,
        metadata_from_json(metadata),
    )


def resolve_artifacts(path):
    """
    Find the model to predict with at ``path``.

    Args:
        path (str): an export folder, or a training OUTPUT_DIR.

    Returns:
        Artifacts

    Raises:
        ArtifactError: ``path`` holds neither an export nor checkpoints, or what it holds is
            incomplete, corrupt or inconsistent.
    """
    if not os.path.isdir(path):
        raise ArtifactError(f"Artifacts folder {path} does not exist.")
    if os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        return _from_export(path)
    export_dir = _export_dir_of_run(path)
    if os.path.isfile(os.path.join(export_dir, MANIFEST_NAME)):
        return _from_export(export_dir)
    if list_checkpoints(path):
        return _from_checkpoint(path)
    raise ArtifactError(
        f"{path} holds neither an export ({MANIFEST_NAME}) nor checkpoints (model_*.pth)."
    )
