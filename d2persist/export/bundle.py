"""
The inference bundle, write side: everything a predicting process needs, and nothing it must
not run (the read side is :mod:`d2persist.artifacts.manifest`).

An export folder holds ``model.safetensors`` (weights only), ``config.yaml`` (paths relative to
the bundle), with PERSIST.EXPORT_FORMATS "onnx" also ``model.onnx`` (see
:mod:`d2persist.export.onnx_graph`), and ``manifest.json``: dataset metadata, the input contract,
versions, the ONNX contract, and the sha256 and size of every other file. The manifest is
written last; a folder without it is an incomplete bundle.
"""

import logging
import os
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from ..artifacts.bundle import FORMAT, LOADED, read_manifest, software_versions
from ..errors import ExportError
from ..files.atomic import fsync_dir, remove_temp_files, sha256_file, write_bytes, write_json
from ..layout import (
    CONFIG_NAME,
    MANIFEST_NAME,
    ONNX,
    ONNX_INT8,
    ONNX_INT8_NAME,
    ONNX_NAME,
    WEIGHTS_NAME,
)
from .onnx_graph import export_onnx
from .quantize import quantize_onnx

if TYPE_CHECKING:
    from ..runconfig import RunConfig

__all__ = ["write_export", "write_manifest", "add_onnx", "add_int8", "dataset_metadata"]

logger = logging.getLogger(__name__)


def _json_safe(value):
    """``value`` as JSON data, or raise TypeError."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    raise TypeError(type(value).__name__)


def dataset_metadata(dataset_names: Sequence[str]) -> dict:
    """
    What ``MetadataCatalog`` holds for the first training dataset, as JSON data.

    Entries that are not JSON data (functions, objects) are left out with a warning. Dict keys
    become strings; :func:`d2persist.artifacts.manifest.metadata_from_json` turns integer-like keys
    of ``*_id_to_contiguous_id`` maps back into ints.
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


def _onnx_entry(model, export_dir, contract, files):
    """Export ONNX into the bundle; the manifest's entry, or the reason it failed."""
    path = os.path.join(export_dir, ONNX_NAME)
    try:
        entry = export_onnx(model, path, contract)
    except ExportError as e:
        logger.error("No ONNX export: %s The rest of the bundle is complete.", e)
        return {"error": str(e)}
    files[ONNX_NAME] = {"sha256": sha256_file(path), "size": os.path.getsize(path)}
    return dict(entry, file=ONNX_NAME)


def _int8_entry(export_dir, contract, images, files, float_nodes=()):
    """Quantize the bundle's model.onnx; the manifest's entry, or the reason it failed."""
    path = os.path.join(export_dir, ONNX_INT8_NAME)
    try:
        entry = quantize_onnx(os.path.join(export_dir, ONNX_NAME), path, images, contract,
                              float_nodes)
    except ExportError as e:
        logger.error("No INT8 model: %s The rest of the bundle is complete.", e)
        return {"error": str(e)}
    files[ONNX_INT8_NAME] = {"sha256": sha256_file(path), "size": os.path.getsize(path)}
    return dict(entry, file=ONNX_INT8_NAME)


def write_export(run: "RunConfig", model: torch.nn.Module, export_dir: str, iteration: int,
                 metadata: Optional[dict] = None, source: Optional[dict] = None,
                 calibration_images: Sequence[str] = ()) -> dict:
    """
    Write the inference bundle of ``model`` to ``export_dir``, manifest last.

    A model the ONNX exporter cannot handle gets a bundle without ``model.onnx``: the reason
    is logged as an error and recorded in the manifest (``onnx.error``).

    Args:
        run (RunConfig): the run's config (:func:`d2persist.runconfig.run_config`);
            ``options["EXPORT_FORMATS"]`` says whether to export ONNX.
        model (nn.Module): the trained model (not DDP-wrapped).
        export_dir (str): the bundle folder; created if needed.
        iteration (int): the training iteration the weights are from.
        metadata (dict): dataset metadata; from ``MetadataCatalog`` if None.
        source (dict): which weights these are: ``{"from": "final"}`` (default) or
            ``{"from": "best", "metric", "mode", "value"}``; the iteration is added.
        calibration_images (list[str]): with EXPORT_FORMATS "onnx-int8", the training images
            that calibrate the INT8 model.

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
    contract = run.input_contract()
    manifest = {
        "format": FORMAT,
        "config": CONFIG_NAME,
        "config_kind": run.kind,
        "config_extensions": list(run.options["CONFIG_EXTENSIONS"]),
        "weights": WEIGHTS_NAME,
        "iteration": int(iteration),
        "source": dict(source or {"from": "final"}, iteration=int(iteration)),
        "metadata": metadata,
        "input": contract,
        "versions": software_versions(required=("detectron2", "torch")),
        "files": files,
    }
    formats = run.options["EXPORT_FORMATS"]
    if ONNX.format in formats or ONNX_INT8.format in formats:
        manifest[ONNX.entry] = _onnx_entry(model, export_dir, contract, files)
        if ONNX_INT8.format in formats and ONNX.file in files:
            manifest[ONNX_INT8.entry] = _int8_entry(export_dir, contract, calibration_images,
                                                    files)
    write_manifest(export_dir, manifest)
    logger.info("Exported an inference bundle to %s", export_dir)
    return manifest


def write_manifest(export_dir: str, manifest: dict) -> None:
    """
    Write ``manifest`` as the bundle's ``manifest.json``, atomically: the one writer of it. The
    manifest names the bundle's files, so it is written after them (a bundle without it is
    incomplete).
    """
    write_json(os.path.join(export_dir, MANIFEST_NAME), manifest)


def add_onnx(export_dir: str, model: torch.nn.Module) -> dict:
    """
    Add ``model.onnx`` to an existing, verified bundle (``model`` holds its weights); the
    manifest is replaced atomically once the ONNX file is complete.

    Returns:
        dict: the new manifest.

    Raises:
        ArtifactError: the bundle is incomplete or does not verify.
        ExportError: the model cannot be exported (the manifest records why).
    """
    manifest = read_manifest(export_dir, only=LOADED)
    files = dict(manifest["files"])
    if files.pop(ONNX_NAME, None) is not None:  # never name a file while it is replaced
        manifest.pop(ONNX.entry, None)
        write_manifest(export_dir, dict(manifest, files=files))
    path = os.path.join(export_dir, ONNX_NAME)
    try:
        entry = export_onnx(model, path, manifest["input"])
    except ExportError as e:  # the bundle says why it has no ONNX model
        write_manifest(export_dir, dict(manifest, files=files, **{ONNX.entry: {"error": str(e)}}))
        raise
    files[ONNX_NAME] = {"sha256": sha256_file(path), "size": os.path.getsize(path)}
    manifest = dict(_without_results(manifest, ONNX.backend), files=files,
                    **{ONNX.entry: dict(entry, file=ONNX.file)})
    write_manifest(export_dir, manifest)
    return manifest


def _without_results(manifest, backend):
    """The manifest without its evaluation's results of ``backend`` (a model file replaced)."""
    entry = manifest.get("evaluation")
    if not isinstance(entry, dict):
        return manifest
    entry = {k: ({b: v for b, v in entry[k].items() if b != backend}
                 if isinstance(entry.get(k), dict) and k != "reference" else entry[k])
             for k in entry}
    entry["failed"] = [b for b in entry.get("failed") or [] if b != backend]
    return dict(manifest, evaluation=entry)


def add_int8(export_dir: str, images: Sequence[str], float_nodes: Sequence[str] = ()) -> dict:
    """
    Add ``model.int8.onnx`` (``model.onnx`` quantized, calibrated on ``images``, the
    ``float_nodes`` left in float) to an existing bundle whose ``model.onnx`` verifies, or
    replace it; the manifest is replaced atomically once it is complete.

    Returns:
        dict: the new manifest.

    Raises:
        ArtifactError: the bundle is incomplete, has no model.onnx, or does not verify.
        ExportError: no ``images`` (the bundle is left as it is), or ONNX Runtime cannot
            quantize the model (the manifest records why).
    """
    from ..errors import ArtifactError

    images = list(images)
    if not images:  # before the bundle is touched: an INT8 model it has stays
        raise ExportError("INT8 export needs calibration images, and none were given.")
    manifest = read_manifest(export_dir, only=[ONNX_NAME])
    files = dict(manifest["files"])
    if ONNX_NAME not in files:
        raise ArtifactError(f"The bundle {export_dir} has no {ONNX_NAME} to quantize; add one "
                            "with --format onnx first.")
    if files.pop(ONNX_INT8_NAME, None) is not None:  # never name a file while it is replaced
        manifest.pop(ONNX_INT8.entry, None)
        write_manifest(export_dir, dict(manifest, files=files))
    entry = _int8_entry(export_dir, manifest["input"], images, files, float_nodes)
    manifest = dict(manifest, files=files, **{ONNX_INT8.entry: entry})
    manifest = _without_results(manifest, ONNX_INT8.backend)
    write_manifest(export_dir, manifest)
    if "error" in entry:
        raise ExportError(entry["error"])
    return manifest
