"""``load_predictor``: a predictor from artifacts, with PyTorch or with ONNX Runtime."""

import importlib.util
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple, Union

from ..artifacts.manifest import (
    bundle_source, describe_source, evaluation_problem, local_bundle, remote_manifest,
)
from ..artifacts.resolve import resolve_artifacts, safe_extensions
from ..errors import D2PersistError
from ..files.mirror import is_url
from ..layout import BACKENDS, MANIFEST_NAME, ONNX, ONNX_INT8, PRECISIONS, PYTORCH, onnx_model

if TYPE_CHECKING:
    from .onnx_predictor import OnnxPredictor
    from .predictor import Predictor

__all__ = ["load_predictor", "missing_torch_stack", "PredictorSpec", "describe_predictor",
           "check_device"]

logger = logging.getLogger(__name__)

#: What the pytorch backend needs importable (the backends themselves: ``layout.BACKENDS``).
_TORCH_STACK = ("torch", "torchvision", "detectron2")


def missing_torch_stack() -> List[str]:
    """The modules of the pytorch backend (torch, torchvision, detectron2) not installed here."""
    missing = []
    for name in _TORCH_STACK:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # sys.modules[name] is None, or no __spec__
            found = False
        if not found:
            missing.append(name)
    return missing


def _artifacts_and_backend(path: str, backend: str, precision: str, here: bool = True
                           ) -> Tuple[str, str]:
    """
    ``(path, backend)`` of :func:`load_predictor`'s arguments: a URL's bundle downloaded and
    verified (with ``here`` False, the URL kept), "auto" resolved by what this machine can
    import; bad arguments refused (with ``here`` False, the pytorch backend is not refused for
    torch missing here).
    """
    if backend not in BACKENDS:
        raise D2PersistError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}.")
    if precision not in PRECISIONS:
        raise D2PersistError(f"precision must be float or int8, not {precision!r}.")
    if precision == ONNX_INT8.precision:
        if backend == PYTORCH.backend:
            raise D2PersistError("precision int8 is the bundle's INT8 ONNX model: use the "
                                 "onnxruntime backend.")
        backend = ONNX.backend
    if here or not is_url(path):
        path = local_bundle(path)  # an fsspec URL: downloaded and verified
    missing = missing_torch_stack() if backend != ONNX.backend else []
    if backend == "auto":
        backend = ONNX.backend if missing else PYTORCH.backend
    elif missing and here:
        raise D2PersistError(
            f"The pytorch backend needs {', '.join(missing)}, which cannot be imported here; "
            "use the onnxruntime backend (an export with model.onnx) or install them.")
    return path, backend


@dataclass(frozen=True)
class PredictorSpec:
    """
    What :func:`load_predictor` would load, found without building the model: a job's
    identity on Ray's driver, whose actors load their own (on nodes that may have the GPUs
    and packages the driver lacks).

    Attributes:
        backend (str): "pytorch" or "onnxruntime" ("auto" resolved on the describing machine).
        precision (str): "float" or "int8".
        sha256 (str): the weights file's (the loaded predictor's ``sha256``).
        weights (str): which weights, in words, as the artifacts record them (a loaded
            checkpoint may add the iteration and EMA it holds).
        problem (str): the bundle's recorded failure of this backend, or "".
    """

    backend: str
    precision: str
    sha256: str
    weights: str
    problem: str = ""


def describe_predictor(path: str, backend: str = "auto", precision: str = ONNX.precision,
                       here: bool = True) -> PredictorSpec:
    """
    :func:`load_predictor`'s artifacts and backend checked and described, the model not built.

    Args:
        path (str): the artifacts, as :func:`load_predictor`'s.
        backend (str): as :func:`load_predictor`'s.
        precision (str): as :func:`load_predictor`'s.
        here (bool): whether this machine will load it; False (a cluster's driver): the
            pytorch backend is described without torch here (but for a checkpoint without its
            sha256 sidecar, verified by loading it), and a bundle's URL by its manifest and its
            files' sizes, nothing downloaded (the nodes download the bundle and verify it);
            "auto" still resolves by what this machine can import. The device is checked by
            :func:`check_device`.

    Returns:
        PredictorSpec

    Raises:
        D2PersistError: what :func:`load_predictor` refuses before it builds the model.
    """
    from .onnx_predictor import bundle_onnx_model

    path, backend = _artifacts_and_backend(path, backend, precision, here)
    if is_url(path):  # (not here) what the nodes download, by its manifest
        bundle, manifest = remote_manifest(path)
        spec = _spec_of_bundle(manifest, backend, precision, bundle, path)
    elif backend == ONNX.backend:
        bundle, _, manifest = bundle_onnx_model(path, precision)  # its file checked
        spec = _spec_of_bundle(manifest, backend, precision, bundle, path)
    else:
        art = resolve_artifacts(path)
        spec = PredictorSpec(backend, PYTORCH.precision, art.weights_sha256(),
                             describe_source(art.source), art.problem)
    if spec.problem:
        logger.warning(spec.problem)
    return spec


def _spec_of_bundle(manifest: dict, backend: str, precision: str, bundle: str, path: str
                    ) -> PredictorSpec:
    """
    :func:`describe_predictor` of the bundle at ``bundle`` from its manifest (``path``: the
    artifacts as given): its model files are not read.
    """
    from .onnx_predictor import onnx_model_file, onnx_weights_words

    where = f"{bundle.rstrip('/')}/{MANIFEST_NAME}"
    if backend == ONNX.backend:
        name = onnx_model_file(manifest, precision, bundle, path)
        words = onnx_weights_words(manifest, name)
        problem = evaluation_problem(manifest, onnx_model(precision).backend)
    else:
        safe_extensions(manifest.get("config_extensions"), where)  # what a node would import
        name, precision = manifest["weights"], PYTORCH.precision
        words = describe_source(bundle_source(manifest))
        problem = evaluation_problem(manifest, PYTORCH.backend)
    # (a sha256 for every file: checked by read_manifest here, remote_manifest for a URL)
    return PredictorSpec(backend, precision, manifest["files"][name]["sha256"], words,
                         problem or "")


def check_device(backend: str, device: Optional[str]) -> None:
    """
    Refuse, in one sentence, a ``device`` this machine cannot give ``backend``, as
    :func:`load_predictor` would here.

    Args:
        backend (str): "pytorch" or "onnxruntime".
        device (str or None): "cpu", "cuda", or None (the backend's default).

    Raises:
        D2PersistError: this machine has no such device for ``backend``.
    """
    if backend == ONNX.backend:
        _onnx_providers(device)
    else:
        from .predictor import torch_device

        torch_device(device)


def load_predictor(
    path: str,
    device: Optional[str] = None,
    opts: Optional[Sequence[str]] = None,
    allowed_targets: Optional[Sequence[str]] = None,
    backend: str = "auto",
    precision: str = ONNX.precision,
    threads: Optional[int] = None,
    spin: bool = True,
    sha256: Optional[str] = None,
) -> Union["Predictor", "OnnxPredictor"]:
    """
    Load a predictor from an export folder or a training OUTPUT_DIR.

    Args:
        path (str): an export bundle, or a run folder (its export if complete; with PyTorch,
            else its newest checkpoint that verifies and its config.yaml), or the fsspec URL
            of a bundle (``s3://bucket/runs/exp1/export``), downloaded into the cache first.
        device (str): "cpu" or "cuda". PyTorch: the GPU if available when None. ONNX Runtime:
            the CPU when None; "cuda" selects its CUDA execution provider (onnxruntime-gpu),
            and is refused in one sentence where this onnxruntime has none.
        opts (list[str]): PyTorch: config overrides (``KEY VALUE`` pairs, or ``key=value`` for
            LazyConfigs).
        allowed_targets (list[str]): PyTorch, LazyConfig: more module prefixes ``_target_``
            may name.
        backend (str): one of :data:`d2persist.layout.BACKENDS`; "auto" is PyTorch where torch,
            torchvision and detectron2 are installed, else ONNX Runtime.
        precision (str): "float", or "int8" for the bundle's INT8 ONNX model (ONNX Runtime;
            "auto" then means onnxruntime).
        threads (int): ONNX Runtime: its intra-op threads (default: its own choice); PyTorch:
            the process's (``torch.set_num_threads``), set when given (a Ray actor's or
            replica's share of the cores).
        spin (bool): ONNX Runtime: whether its idle threads spin waiting for work (see
            :func:`~d2persist.predict.onnx_predictor.load_onnx_predictor`).
        sha256 (str): PyTorch, a run folder without a complete export: the checkpoint whose
            sidecar gives this sha256 instead of the newest (what a Ray job's driver or a
            server described, loaded by each actor or replica while the run writes newer
            ones), refused in one sentence where the run no longer holds it. Unused for a
            bundle, which holds one weights file.

    Returns:
        :class:`d2persist.predict.predictor.Predictor` or
        :class:`d2persist.predict.onnx_predictor.OnnxPredictor`
        (both are called with an image and give a prediction with ``to_json`` and ``draw``).
    """
    path, backend = _artifacts_and_backend(path, backend, precision)
    if backend == ONNX.backend:
        if opts:
            raise D2PersistError("Config overrides (opts) need the pytorch backend: the ONNX "
                                 "model was fixed when it was exported.")
        from .onnx_predictor import load_onnx_predictor

        return load_onnx_predictor(path, providers=_onnx_providers(device), threads=threads,
                                   precision=precision, spin=spin)
    from .predictor import load_torch_predictor

    if threads:
        import torch

        torch.set_num_threads(threads)
    return load_torch_predictor(path, device, opts, allowed_targets, sha256)


#: ONNX Runtime's execution provider for ``device="cuda"`` (onnxruntime-gpu)
CUDA_PROVIDER = "CUDAExecutionProvider"


def _onnx_providers(device: Optional[str]) -> Optional[List[str]]:
    """ONNX Runtime's providers for ``device`` (None: its default, the CPU)."""
    if device in (None, "cpu"):
        return None
    if device != "cuda":
        raise D2PersistError(f"device must be cpu or cuda, not {device!r}.")
    import onnxruntime as ort

    available = ort.get_available_providers()
    if CUDA_PROVIDER not in available:
        raise D2PersistError(
            "Device cuda with the onnxruntime backend needs ONNX Runtime's "
            f"{CUDA_PROVIDER} (pip install onnxruntime-gpu); this onnxruntime has "
            f"{', '.join(available)}.")
    return [CUDA_PROVIDER, "CPUExecutionProvider"]
