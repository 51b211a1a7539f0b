"""
d2persist: make a detectron2 training run persist everything needed to resume it or to predict
with it later, and make prediction from those artifacts give exactly what evaluation gave.

The public API is re-exported here, from the subpackages that define it: ``files`` (how bytes
travel), ``artifacts`` (the run folder and bundle, read side), ``predict``, ``export``, ``scale``
(prediction at scale), ``training``. Names are imported on first use, so that prediction
(``load_predictor``) never pays for importing the training engine, and ONNX Runtime prediction
works where neither torch nor detectron2 is installed; the ``TYPE_CHECKING`` imports below let
editors and type checkers resolve every name to its definition.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_INSTALL_HINT = (
    "d2persist needs detectron2 for this, which is not on PyPI: install it from its repository "
    "as its INSTALL.md says (e.g. `make install`, or `python3 -m pip install "
    "--no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'`). "
    "Prediction with ONNX Runtime (load_predictor(..., backend='onnxruntime')) needs neither "
    "torch nor detectron2."
)
_TRAINING_STACK = ("torch", "torchvision", "detectron2", "fvcore", "omegaconf")

#: public name -> module that defines it
_EXPORTS = {
    "add_persist_config": "config",
    "run_config": "runconfig",
    "RunConfig": "runconfig",
    "PersistHook": "training.hook",
    "PersistTrainer": "training.trainer",
    "PersistCheckpointer": "training.checkpointer",
    "train_lazy": "training.lazy_trainer",
    "resume_or_load": "training.resume",
    "load_predictor": "predict.load",
    "OnnxPredictor": "predict.onnx_predictor",
    "Predictor": "predict.predictor",
    "Prediction": "predict.predictor",
    "evaluate_coco": "predict.evaluate",
    "predict_source": "scale.batch",
    "DatasetMismatchError": "errors",
    "Artifacts": "artifacts.resolve",
    "resolve_artifacts": "artifacts.resolve",
    "read_manifest": "artifacts.bundle",
    "open_view": "artifacts.view",
    "RunView": "artifacts.view",
    "write_export": "export.bundle",
    "evaluate_bundle": "export.self_eval",
    "register_shapes": "data.shapes",
    "D2PersistError": "errors",
    "ExportError": "errors",
    "ConfigError": "errors",
    "ArtifactError": "errors",
    "UnsafeArtifactError": "errors",
    "InputImageError": "errors",
    "OutputPathError": "errors",
    "ConfigRoundTripError": "errors",
    "OutputDirNotEmptyError": "errors",
    "CheckpointWriteError": "errors",
    "RunFolderBusyError": "errors",
    "TrainingDivergedError": "errors",
    "EarlyStopped": "errors",
}

if TYPE_CHECKING:  # what editors and type checkers see: every name, from where it is defined
    from .artifacts.bundle import read_manifest
    from .artifacts.resolve import Artifacts, resolve_artifacts
    from .artifacts.view import RunView, open_view
    from .config import add_persist_config
    from .data.shapes import register_shapes
    from .errors import (
        ArtifactError,
        CheckpointWriteError,
        ConfigError,
        ConfigRoundTripError,
        D2PersistError,
        DatasetMismatchError,
        EarlyStopped,
        ExportError,
        InputImageError,
        OutputDirNotEmptyError,
        OutputPathError,
        RunFolderBusyError,
        TrainingDivergedError,
        UnsafeArtifactError,
    )
    from .export.bundle import write_export
    from .export.self_eval import evaluate_bundle
    from .predict.evaluate import evaluate_coco
    from .predict.load import load_predictor
    from .predict.onnx_predictor import OnnxPredictor
    from .predict.predictor import Prediction, Predictor
    from .runconfig import RunConfig, run_config
    from .scale.batch import predict_source
    from .training.checkpointer import PersistCheckpointer
    from .training.hook import PersistHook
    from .training.lazy_trainer import train_lazy
    from .training.resume import resume_or_load
    from .training.trainer import PersistTrainer

__all__ = [
    "ArtifactError",
    "Artifacts",
    "CheckpointWriteError",
    "ConfigError",
    "ConfigRoundTripError",
    "D2PersistError",
    "DatasetMismatchError",
    "EarlyStopped",
    "ExportError",
    "InputImageError",
    "OnnxPredictor",
    "OutputDirNotEmptyError",
    "OutputPathError",
    "PersistCheckpointer",
    "PersistHook",
    "PersistTrainer",
    "Prediction",
    "Predictor",
    "RunConfig",
    "RunFolderBusyError",
    "RunView",
    "TrainingDivergedError",
    "UnsafeArtifactError",
    "add_persist_config",
    "evaluate_bundle",
    "evaluate_coco",
    "load_predictor",
    "open_view",
    "predict_source",
    "read_manifest",
    "register_shapes",
    "resolve_artifacts",
    "resume_or_load",
    "run_config",
    "train_lazy",
    "write_export",
    "__version__",
]


def __getattr__(name):
    if name in _EXPORTS:
        try:
            module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] in _TRAINING_STACK:
                raise ImportError(f"{_INSTALL_HINT} (importing {e.name} failed)") from e
            raise
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'd2persist' has no attribute {name!r}")


def __dir__():
    return __all__
