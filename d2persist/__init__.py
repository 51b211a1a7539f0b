"""
d2persist: make a detectron2 training run persist everything needed to resume it or to predict
with it later, and make prediction from those artifacts give exactly what evaluation gave.

The public API is re-exported here. Names are imported on first use, so that prediction
(``load_predictor``) never pays for importing the training engine, and ONNX Runtime prediction
works where neither torch nor detectron2 is installed.
"""

import importlib

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
    "PersistHook": "hook",
    "PersistTrainer": "trainer",
    "PersistCheckpointer": "checkpoint",
    "load_predictor": "load",
    "OnnxPredictor": "onnx_predictor",
    "Predictor": "predictor",
    "Prediction": "predictor",
    "train_lazy": "lazy_trainer",
    "resume_or_load": "checkpoint",
    "run_config": "runconfig",
    "RunConfig": "runconfig",
    "Artifacts": "artifacts",
    "resolve_artifacts": "artifacts",
    "write_export": "export",
    "read_manifest": "manifest",
    "register_shapes": "data.shapes",
    "evaluate_coco": "evaluate",
    "evaluate_bundle": "bundle_eval",
    "open_view": "runview",
    "RunView": "runview",
    "DatasetMismatchError": "evaluate",
    "D2PersistError": "errors",
    "ExportError": "errors",
    "ConfigError": "errors",
    "ArtifactError": "errors",
    "UnsafeArtifactError": "errors",
    "InputImageError": "errors",
    "ConfigRoundTripError": "errors",
    "OutputDirNotEmptyError": "errors",
    "CheckpointWriteError": "errors",
    "RunFolderBusyError": "errors",
    "TrainingDivergedError": "errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


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
