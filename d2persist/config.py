"""
``cfg.PERSIST``: the options of :class:`d2persist.PersistHook`, and their defaults.

Imports nothing from detectron2 until :func:`add_persist_config` is called, so the defaults
(:data:`DEFAULT_OPTIONS`) are readable where only ONNX Runtime is installed.
"""

import types
from typing import TYPE_CHECKING

from .layout import PYTORCH

if TYPE_CHECKING:
    from detectron2.config import CfgNode

__all__ = ["add_persist_config", "PERSIST_KEY", "DEFAULT_OPTIONS"]

#: The config node that holds d2persist's options.
PERSIST_KEY = "PERSIST"


def add_persist_config(cfg: "CfgNode") -> "CfgNode":
    """
    Add the ``cfg.PERSIST`` options of d2persist to a detectron2 config, with safe defaults.

    A LazyConfig takes the same keys, in lower case, in an optional ``train.persist`` dict.

    Args:
        cfg (CfgNode): a config from ``detectron2.config.get_cfg()``; changed in place.

    Returns:
        CfgNode: the same ``cfg``.
    """
    from detectron2.config import CfgNode as CN

    cfg.PERSIST = _fill(CN())
    return cfg


def _fill(p):
    """Set every option's default on ``p`` (a CfgNode, or any object), with its comment."""
    # Periodic checkpoints to keep (0 keeps all); last_checkpoint's target and model_final stay.
    p.MAX_TO_KEEP = 0
    # Write an inference bundle (safetensors weights, config, manifest) when training completes.
    p.EXPORT = True
    # Folder of that bundle; a relative path is taken under OUTPUT_DIR.
    p.EXPORT_DIR = "export"
    # Weights formats of the bundle: "safetensors" (always written), "onnx" (export/model.onnx,
    # runnable by ONNX Runtime without torch or detectron2), "onnx-int8" (also
    # export/model.int8.onnx: model.onnx quantized to INT8 by ONNX Runtime, for CPUs).
    p.EXPORT_FORMATS = [PYTORCH.format]
    # Training images (spread over the first training dataset) that calibrate the INT8 model.
    p.CALIBRATION_IMAGES = 64
    # How far the INT8 model may score from the in-training evaluation, on each family's headline
    # metric (box, mask, keypoint AP, PQ, mIoU): the export's self-evaluation keeps the most
    # sensitive layers in float (measured, most sensitive first) until it is within.
    p.INT8_BUDGET = 1.0
    # When training completes, evaluate the bundle (loaded from its folder) through each backend
    # it holds on the first test dataset with the run's evaluator, compare with the final
    # evaluation and record it in the manifest's "evaluation" entry.
    p.EXPORT_EVAL = True
    # Keep OUTPUT_DIR/training.png: losses, learning rate, evaluations, checkpoints and the best,
    # redrawn after each evaluation and when training ends (main process, background thread).
    p.PLOT = True
    # fsspec URL (s3://bucket/runs/exp1, gs://..., file://...) that receives a copy of every
    # file the run writes, from a background thread; "" for none.
    p.MIRROR = ""
    # Copy each checkpoint into one reused CPU buffer, then write it from a background thread.
    p.ASYNC = True
    # On a STOP_SIGNALS signal, finish the current iteration, save a resumable checkpoint, stop.
    p.SAVE_ON_INTERRUPT = True
    # Signals that stop a run that way, on whichever process gets them; add "SIGUSR1" for a
    # scheduler's warning (SLURM --signal=B:USR1@120, submitit). Exit code: 128 + the signal's.
    p.STOP_SIGNALS = ["SIGINT", "SIGTERM"]
    # Also save once this many minutes have passed since the last save (the main process's
    # clock decides for all); 0 saves by SOLVER.CHECKPOINT_PERIOD only.
    p.CHECKPOINT_MINUTES = 0.0
    # Metric that picks the best weights, as EvalHook stores it ("bbox/AP", "segm/AP50"); "" off.
    p.BEST_METRIC = ""
    # "max" or "min": whether a larger or a smaller BEST_METRIC is better.
    p.BEST_MODE = "max"
    # Stop training after this many evaluations in a row without an improvement of BEST_METRIC
    # by more than EARLY_STOP_MIN_DELTA (0: off). A stopped run is a completed run: final
    # checkpoint, export, its self-evaluation.
    p.EARLY_STOP_PATIENCE = 0
    # How much BEST_METRIC must improve (in its own units) to count as an improvement.
    p.EARLY_STOP_MIN_DELTA = 0.0
    # At each evaluation, also the model's own loss terms on the first test dataset (training
    # mode, no augmentation, no gradients, BatchNorm on its running statistics), averaged over
    # its images: "validation/total_loss" and "validation/<term>", usable as BEST_METRIC (min).
    p.VAL_LOSS = False
    # Keep an exponential moving average of the weights (and buffers) with this decay, updated
    # after every optimizer step and saved in every checkpoint (0: off; e.g. 0.9998).
    p.EMA_DECAY = 0.0
    # Warm-up of that decay, in iterations: decay * (1 - exp(-updates / EMA_WARMUP)); 0: none.
    p.EMA_WARMUP = 2000
    # With EMA_DECAY: evaluate, pick the best model and export the averaged weights.
    p.EMA_EVAL = True
    # Weights of the inference export: "final" (end of training) or "best" (model_best.pth).
    p.EXPORT_FROM = "final"
    # "module:add_*_config" of a project's config function: applied when config.yaml is checked
    # and when a predictor loads the run's config (the import also registers its models).
    p.CONFIG_EXTENSIONS = []
    return p


#: ``cfg.PERSIST``'s defaults, for a config that never called :func:`add_persist_config`.
DEFAULT_OPTIONS = dict(vars(_fill(types.SimpleNamespace())))
