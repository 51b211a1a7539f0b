"""
The names of every file and folder d2persist writes, in one place.

A run folder (``OUTPUT_DIR``) holds detectron2's checkpoint names and pointer file, so stock
detectron2 reads it unchanged; an export bundle holds weights, config and a manifest.
"""

import re

__all__ = [
    "CONFIG_NAME",
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
    "TRAINING_PLOT",
    "checkpoint_name",
    "checkpoint_iteration",
]

#: A run's config (loads with a plain ``get_cfg().merge_from_file``); also the bundle's config.
CONFIG_NAME = "config.yaml"
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

_PERIODIC = re.compile(r"^model_(\d{7,})\.pth$")


def checkpoint_name(iteration: int) -> str:
    """The file name detectron2's PeriodicCheckpointer uses for ``iteration``."""
    return f"model_{iteration:07d}.pth"


def checkpoint_iteration(name: str):
    """The iteration in a periodic checkpoint's file name, or None for any other name."""
    m = _PERIODIC.match(name)
    return int(m.group(1)) if m else None
