"""
Resolve what a user points prediction at: an export bundle, or a run's output folder.

A run folder is predicted from through its export when that export is complete; otherwise
(interrupted, or still training) through its newest checkpoint that verifies and its
``config.yaml``. Nothing here imports training code.
"""

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..errors import ArtifactError, D2PersistError, UnsafeArtifactError
from ..files.atomic import check_unchanged, file_identity, resolve_inside
from ..files.safe_load import read_json, safe_yaml_load
from ..layout import (
    CONFIG_NAME,
    MANIFEST_NAME,
    METADATA_NAME,
    PERSIST_FILE,
    PYTORCH,
    checkpoint_iteration,
)
from ..runconfig import check_extension_names
from .bundle import (
    LOADED,
    check_artifacts_folder,
    find_bundle,
    persist_options_of_run,
    read_manifest,
)
from .checkpoints import checkpoint_sha256
from .manifest import bundle_source, evaluation_problem, metadata_from_json
from .view import list_checkpoints, newest_valid_noted

__all__ = ["Artifacts", "resolve_artifacts", "safe_extensions"]


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
        config_extensions (list[str]): the run's ``PERSIST.CONFIG_EXTENSIONS`` (yacs).
        source (dict): which weights these are (see
        :func:`d2persist.artifacts.manifest.describe_source`).
        problem (str): an export whose evaluation recorded the PyTorch backend as failed: the
            sentence saying so (see :func:`d2persist.artifacts.manifest.evaluation_problem`); else
            "".
        evaluation (dict or None): an export's self-evaluation (its manifest's ``evaluation``).
        sha256 (str or None): the weights file's sha256, where the artifact records it (an
            export's manifest, checked when it was read; a checkpoint's sidecar, which it was
            verified against).
        identities (dict): the weights' (and an export's config's)
            :func:`~d2persist.files.atomic.file_identity` from before they were verified, for
            :meth:`check_unchanged` once the model is loaded.
    """

    kind: str
    root: str
    config: dict = field(repr=False)
    config_kind: str
    weights_path: str
    metadata: dict = field(repr=False)
    iteration: Optional[int] = None
    config_extensions: List[str] = field(default_factory=list)
    source: dict = field(default_factory=dict)
    problem: str = ""
    evaluation: Optional[dict] = None
    sha256: Optional[str] = None
    identities: Dict[str, Optional[Tuple[int, int, int, int]]] = field(default_factory=dict,
                                                                       repr=False)

    def weights_sha256(self) -> str:
        """The weights file's sha256: as the artifact or its sidecar records it, else hashed."""
        return self.sha256 or checkpoint_sha256(self.weights_path)

    def check_unchanged(self) -> None:
        """
        Refuse, in one sentence, weights or a config replaced since they were verified (a
        resumed run exporting again, a new ``model_final.pth``): what was loaded from them
        may not be what was verified, nor what :meth:`weights_sha256` names.

        Raises:
            ArtifactError: one of them changed.
        """
        for path, identity in self.identities.items():
            check_unchanged(path, identity)


def safe_extensions(names: Optional[List[str]], where: str) -> List[str]:
    """
    The config extensions an artifact names (``PERSIST.CONFIG_EXTENSIONS``), refused unless
    each is ``module:add_*config`` (a predictor imports and calls them).

    Raises:
        UnsafeArtifactError: naming ``where`` (the file that lists them) and the bad entry.
    """
    try:
        return check_extension_names(names or [])
    except D2PersistError as e:
        raise UnsafeArtifactError(f"{where}: {e}") from None


def _config_kind(config, path):
    if not isinstance(config, dict):
        raise ArtifactError(f"{path} does not hold a config mapping.")
    if "MODEL" in config:
        return "yacs"
    if "model" in config:
        return "lazy"
    raise ArtifactError(f"{path} is neither a detectron2 config nor a LazyConfig.")


def _from_export(folder):
    listed = read_manifest(folder, verify=False)  # the names: each file noted, then verified
    loaded = [resolve_inside(folder, listed[key]) for key in ("config", "weights")]
    identities = {path: file_identity(path) for path in loaded}
    manifest = read_manifest(folder, only=LOADED)
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
        safe_extensions(manifest.get("config_extensions"), os.path.join(folder, MANIFEST_NAME)),
        bundle_source(manifest),
        evaluation_problem(manifest, PYTORCH.backend) or "",
        manifest.get("evaluation"),
        (manifest.get("files") or {}).get(manifest["weights"], {}).get("sha256"),
        identities,
    )


def _from_checkpoint(folder, sha256=None):
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise ArtifactError(f"{folder} has checkpoints but no {CONFIG_NAME} to rebuild the model.")
    config = safe_yaml_load(config_path)
    extensions = safe_extensions(persist_options_of_run(folder).get("CONFIG_EXTENSIONS"),
                                 os.path.join(folder, PERSIST_FILE))
    found = newest_valid_noted(folder, sha256)
    if found is None and sha256 is not None:
        raise ArtifactError(f"{folder} no longer holds a checkpoint with sha256 {sha256[:12]}… "
                            "that verifies (the run's retention removed it): start again.")
    if found is None:
        raise ArtifactError(f"No checkpoint in {folder} verifies (all are truncated or corrupt).")
    weights, identity, sha256 = found  # (the file verified, and what it was verified against)
    identities = {weights: identity}
    meta_path = os.path.join(folder, METADATA_NAME)
    metadata = read_json(meta_path) if os.path.isfile(meta_path) else {}
    checkpoint = os.path.basename(weights)
    return Artifacts(
        "checkpoint", folder, config, _config_kind(config, config_path), weights,
        metadata_from_json(metadata), checkpoint_iteration(checkpoint), extensions,
        {"from": "checkpoint", "file": checkpoint, "iteration": checkpoint_iteration(checkpoint)},
        sha256=sha256, identities=identities,
    )


def resolve_artifacts(path: str, sha256: Optional[str] = None) -> Artifacts:
    """
    Find the model to predict with at ``path``.

    Args:
        path (str): an export folder, or a training OUTPUT_DIR.
        sha256 (str): of a run folder's checkpoints, the one whose sidecar gives this sha256
            instead of the newest (unused for an export, which holds one weights file).

    Returns:
        Artifacts

    Raises:
        ArtifactError: ``path`` holds neither an export nor checkpoints, or what it holds is
            incomplete, corrupt or inconsistent.
    """
    check_artifacts_folder(path)
    bundle = find_bundle(path)
    if bundle is not None:
        return _from_export(bundle)
    if list_checkpoints(path):
        return _from_checkpoint(path, sha256)
    raise ArtifactError(
        f"{path} holds neither an export ({MANIFEST_NAME}) nor checkpoints (model_*.pth)."
    )
