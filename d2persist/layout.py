"""
The names of every file and folder d2persist writes, and every spelling of its model files,
in one place.

A run folder (``OUTPUT_DIR``) holds detectron2's checkpoint names and pointer file, so stock
detectron2 reads it unchanged; an export bundle holds weights, config and a manifest, and
optionally its ONNX models. Each model a bundle can hold is one :class:`ModelFile` row, which
names it the way each place needs (its ``PERSIST.EXPORT_FORMATS`` value, its file, its manifest
entry, the backend that runs it, its precision): code that needs one of these spellings takes it
from the row, never from a string literal.
"""

import os
import re
from dataclasses import dataclass
from typing import Optional

__all__ = [
    "cache_root",
    "CONFIG_NAME",
    "CONFIG_PICKLE",
    "PERSIST_FILE",
    "METADATA_NAME",
    "LAST_CHECKPOINT",
    "FINAL_NAME",
    "SIDECAR_SUFFIX",
    "TEMP_PREFIX",
    "LOCK_NAME",
    "DEFAULT_EXPORT_DIR",
    "MANIFEST_NAME",
    "WEIGHTS_NAME",
    "ONNX_NAME",
    "ONNX_INT8_NAME",
    "BEST_NAME",
    "BEST_RECORD",
    "METRICS_NAME",
    "EVALUATIONS_NAME",
    "EMA_STATE_KEY",
    "PREDICT_OPTIONS_NAME",
    "PREDICT_JOB_NAME",
    "DEFAULT_MIN_SCORE",
    "TRAINING_PLOT",
    "checkpoint_name",
    "checkpoint_iteration",
    "ModelFile",
    "PYTORCH",
    "ONNX",
    "ONNX_INT8",
    "MODEL_FILES",
    "EXPORT_FORMATS",
    "EVAL_BACKENDS",
    "PRECISIONS",
    "BACKENDS",
    "ONNX_TASKS",
    "onnx_model",
]

#: A run's config (loads with a plain ``get_cfg().merge_from_file``); also the bundle's config.
CONFIG_NAME = "config.yaml"
#: what LazyConfig.save writes beside config.yaml for objects YAML cannot hold (a run
#: with PERSIST.EXPORT False may have one)
CONFIG_PICKLE = CONFIG_NAME + ".pkl"
#: d2persist's own options of a yacs run, kept out of config.yaml so stock code loads that.
PERSIST_FILE = "persist.yaml"
#: The training dataset's metadata (class names, colours, ...).
METADATA_NAME = "metadata.json"
#: The pointer file detectron2 reads to find the checkpoint to resume from.
LAST_CHECKPOINT = "last_checkpoint"
#: The checkpoint written when training completes.
FINAL_NAME = "model_final.pth"
#: The checkpoint of the best evaluation (PERSIST.BEST_METRIC); retention never removes it.
BEST_NAME = "model_best.pth"
#: Which evaluation that was: metric, mode, value, iteration, time.
BEST_RECORD = "best.json"
#: detectron2's JSONWriter's log of every scalar (losses, evaluation metrics) by iteration.
METRICS_NAME = "metrics.json"
#: every evaluation of a run, as it happened (PersistHook; metrics.json keeps only some)
EVALUATIONS_NAME = "evaluations.json"
#: Where a checkpoint keeps the EMA weights (PERSIST.EMA_DECAY): an entry of PersistHook's
#: state, ``checkpoint["trainer"]["hooks"]["PersistHook"]["ema"]``: ``model`` (the average),
#: ``updates``, ``decay``, ``warmup``, ``evaluated`` (whether the run evaluated the average).
EMA_STATE_KEY = "ema"
#: ``d2persist predict``: the job a destination holds the outputs of (weights, options)
PREDICT_OPTIONS_NAME = ".d2persist-predict.json"
#: ``d2persist predict``: the job's record, written once every input has its output
PREDICT_JOB_NAME = "job.json"
#: The score below which predicted instances are left out of JSON and pictures, unless told
#: (``infer_single``, ``d2persist predict`` and ``serve``'s ``min_score``)
DEFAULT_MIN_SCORE = 0.5
#: The run's picture (PERSIST.PLOT): losses, learning rate, evaluations, checkpoints, best.
TRAINING_PLOT = "training.png"
#: Ending of the ``sha256sum``-format file next to each checkpoint.
SIDECAR_SUFFIX = ".sha256"
#: Prefix of the temporary files written next to their final name.
TEMP_PREFIX = ".d2persist-tmp-"
#: The run lock: the training process writing a run folder holds an OS lock on this file.
LOCK_NAME = ".d2persist.lock"
#: The export bundle's folder inside a run folder, unless PERSIST.EXPORT_DIR says otherwise.
DEFAULT_EXPORT_DIR = "export"
#: The bundle's manifest, written last: a bundle without it is incomplete.
MANIFEST_NAME = "manifest.json"
#: The bundle's weights.
WEIGHTS_NAME = "model.safetensors"
#: The bundle's portable model (PERSIST.EXPORT_FORMATS with "onnx").
ONNX_NAME = "model.onnx"
#: Its INT8 version (PERSIST.EXPORT_FORMATS with "onnx-int8"): ONNX Runtime static quantization.
ONNX_INT8_NAME = "model.int8.onnx"


@dataclass(frozen=True)
class ModelFile:
    """One model a bundle can hold, with every spelling of it (a row of :data:`MODEL_FILES`)."""

    #: its ``PERSIST.EXPORT_FORMATS`` value and ``export_model.py --format``
    format: str
    #: its file in the bundle
    file: str
    #: the manifest entry that describes it (the weights: ``"weights"``, which names the file)
    entry: str
    #: the backend that runs it, as the manifest's evaluation, ``ls`` and the bench name it
    backend: str
    #: its ``--precision`` / ``load_predictor(precision=...)``
    precision: str


#: The bundle's weights, run by PyTorch (and detectron2).
PYTORCH = ModelFile("safetensors", WEIGHTS_NAME, "weights", "pytorch", "float")
#: The portable model, run by ONNX Runtime without torch or detectron2.
ONNX = ModelFile("onnx", ONNX_NAME, "onnx", "onnxruntime", "float")
#: ONNX Runtime's INT8 version of it, for CPUs.
ONNX_INT8 = ModelFile("onnx-int8", ONNX_INT8_NAME, "onnx_int8", "onnxruntime-int8", "int8")
#: Every model file, in the order the manifest's evaluation and ``ls`` list them.
MODEL_FILES = (PYTORCH, ONNX, ONNX_INT8)
#: PERSIST.EXPORT_FORMATS values.
EXPORT_FORMATS = tuple(m.format for m in MODEL_FILES)
#: The backends the manifest's evaluation records.
EVAL_BACKENDS = tuple(m.backend for m in MODEL_FILES)
#: ``--precision`` values.
PRECISIONS = (ONNX.precision, ONNX_INT8.precision)
#: ``--backend`` values: a backend, or "auto" (PyTorch where it is installed, else ONNX Runtime).
BACKENDS = (PYTORCH.backend, ONNX.backend, "auto")
#: the tasks of an ONNX graph (its manifest entry's ``task``), each post-processed its own way
ONNX_TASKS = ("rcnn", "dense", "semantic", "rpn", "panoptic")


def onnx_model(precision: str) -> ModelFile:
    """The ONNX model file of ``precision`` (``"float"`` or ``"int8"``)."""
    return ONNX_INT8 if precision == ONNX_INT8.precision else ONNX


def cache_root() -> str:
    """
    d2persist's cache folder (the synthetic datasets, bundles from URLs, ONNX Runtime's
    graphs): ``$D2PERSIST_CACHE`` if set and not empty, else ``~/.cache/d2persist``; where
    there is no home (no ``$HOME``, a user with no passwd entry: a container's),
    ``d2persist-cache-UID`` in the temporary folder, never a folder named "~" where the
    command runs.
    """
    given = os.environ.get("D2PERSIST_CACHE")
    if given:
        return given
    home = os.path.expanduser("~")
    if os.path.isabs(home):
        return os.path.join(home, ".cache", "d2persist")
    import tempfile

    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return os.path.join(tempfile.gettempdir(), f"d2persist-cache-{uid}")


_PERIODIC = re.compile(r"^model_(\d{7,})\.pth$")


def checkpoint_name(iteration: int) -> str:
    """The file name detectron2's PeriodicCheckpointer uses for ``iteration``."""
    return f"model_{iteration:07d}.pth"


def checkpoint_iteration(name: str) -> Optional[int]:
    """The iteration in a periodic checkpoint's file name, or None for any other name."""
    m = _PERIODIC.match(name)
    return int(m.group(1)) if m else None
