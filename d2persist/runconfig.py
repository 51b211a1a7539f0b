"""
One view of a run's config, whether a yacs ``CfgNode`` or a LazyConfig (``DictConfig``).

:func:`run_config` gives a :class:`RunConfig` whose two kinds answer the same questions: *where*
the run writes, *how often* it checkpoints, *what* text its ``config.yaml`` holds (checked to
load back), which datasets it trains on and which input its model expects.
"""

import contextlib
import copy
import importlib
import logging
import math
import os
import re
import sys
import tempfile
from collections.abc import MutableSequence
from typing import TYPE_CHECKING, Any, Callable, Collection, Dict, List, Optional, Sequence, Union

import yaml

from .config import DEFAULT_OPTIONS, PERSIST_KEY, add_persist_config
from .errors import ConfigError, ConfigRoundTripError
from .files.atomic import atomic_path, write_text
from .files.safe_load import safe_yaml_loads
from .layout import CONFIG_NAME, EXPORT_FORMATS, PERSIST_FILE

if TYPE_CHECKING:
    from detectron2.config import CfgNode
    from detectron2.engine import TrainerBase
    from detectron2.evaluation import DatasetEvaluator
    from omegaconf import DictConfig

__all__ = [
    "RunConfig",
    "YacsRunConfig",
    "LazyRunConfig",
    "run_config",
    "flatten_config",
    "persist_options",
    "load_config_dict",
    "check_extension_names",
    "save_lazy_config",
]

logger = logging.getLogger(__name__)

_EXTENSION = re.compile(r"^[A-Za-z_][\w.]*:add_\w*config$")


def _is_lazy(cfg):
    from omegaconf import DictConfig

    return isinstance(cfg, DictConfig)


def persist_options(cfg: Union["CfgNode", "DictConfig"]) -> Dict[str, Any]:
    """
    d2persist's options of a config, defaults filled in.

    yacs configs keep them in ``cfg.PERSIST`` (:func:`add_persist_config`); LazyConfigs in an
    optional ``train.persist`` dict with the same keys in lower case (``MAX_TO_KEEP``, where it
    does not set it: ``train.checkpointer.max_to_keep``, as detectron2's loop keeps).

    Raises:
        ConfigRoundTripError: naming an option d2persist does not have.
    """
    opts = copy.deepcopy(DEFAULT_OPTIONS)
    if _is_lazy(cfg):
        opts.update(lazy_options_given(cfg.train))
    elif PERSIST_KEY in cfg:
        opts.update(dict(cfg[PERSIST_KEY]))
    unknown: Collection[str] = set(opts) - set(DEFAULT_OPTIONS)
    if unknown:
        raise ConfigRoundTripError(f"Unknown d2persist option(s): {', '.join(sorted(unknown))}.")
    for key in ("CONFIG_EXTENSIONS", "EXPORT_FORMATS", "STOP_SIGNALS"):
        value = opts[key]  # (one name alone: a list of it, not its letters)
        if isinstance(value, str):
            opts[key] = [value]
        elif not isinstance(value, Sequence):  # (OmegaConf's ListConfig is one)
            raise ConfigError(f"PERSIST.{key} must be a list of names ([] for none), not "
                              f"{value!r}.")
    for key in ("EXPORT", "EXPORT_EVAL", "PLOT", "ASYNC", "SAVE_ON_INTERRUPT", "VAL_LOSS",
                "EMA_EVAL"):
        opts[key] = _flag(opts, key)
    opts["CONFIG_EXTENSIONS"] = check_extension_names(opts["CONFIG_EXTENSIONS"])
    formats = [str(f) for f in opts["EXPORT_FORMATS"]]
    unknown = sorted(set(formats) - set(EXPORT_FORMATS))
    if unknown:
        raise ConfigError(
            f"PERSIST.EXPORT_FORMATS {unknown} unknown: choose from {', '.join(EXPORT_FORMATS)}."
        )
    opts["EXPORT_FORMATS"] = formats
    images, budget = opts["CALIBRATION_IMAGES"], opts["INT8_BUDGET"]
    number = _number(images)
    if not (1 <= number < math.inf and number == int(number)):
        raise ConfigError("PERSIST.CALIBRATION_IMAGES must be a whole number of images >= 1, "
                          f"not {images!r}.")
    opts["CALIBRATION_IMAGES"] = int(number)
    opts["INT8_BUDGET"] = _number(budget)
    if not 0 <= opts["INT8_BUDGET"] < math.inf:  # also NaN
        raise ConfigError("PERSIST.INT8_BUDGET must be a number of metric points >= 0, not "
                          f"{budget!r}.")
    if opts["BEST_MODE"] not in ("max", "min"):
        raise ConfigError(f"PERSIST.BEST_MODE must be 'max' or 'min', not {opts['BEST_MODE']!r}.")
    if opts["EXPORT_FROM"] not in ("final", "best"):
        raise ConfigError(
            f"PERSIST.EXPORT_FROM must be 'final' or 'best', not {opts['EXPORT_FROM']!r}."
        )
    if opts["EXPORT_FROM"] == "best" and not opts["BEST_METRIC"]:
        raise ConfigError("PERSIST.EXPORT_FROM 'best' needs PERSIST.BEST_METRIC (e.g. 'bbox/AP').")
    patience, delta = opts["EARLY_STOP_PATIENCE"], opts["EARLY_STOP_MIN_DELTA"]
    try:
        opts["EARLY_STOP_PATIENCE"] = int(patience)
        bad = isinstance(patience, bool) or opts["EARLY_STOP_PATIENCE"] != float(patience)
    except (TypeError, ValueError, OverflowError):
        bad = True
    if bad or opts["EARLY_STOP_PATIENCE"] < 0:
        raise ConfigError("PERSIST.EARLY_STOP_PATIENCE must be a number of evaluations >= 0 "
                          f"(0: off), not {patience!r}.")
    try:
        opts["EARLY_STOP_MIN_DELTA"] = float(delta)
    except (TypeError, ValueError):
        opts["EARLY_STOP_MIN_DELTA"] = -1.0
    if not opts["EARLY_STOP_MIN_DELTA"] >= 0:  # also NaN
        raise ConfigError("PERSIST.EARLY_STOP_MIN_DELTA must be a number >= 0, not "
                          f"{delta!r}.")
    if opts["EARLY_STOP_PATIENCE"] and not opts["BEST_METRIC"]:
        raise ConfigError("PERSIST.EARLY_STOP_PATIENCE needs PERSIST.BEST_METRIC, the metric "
                          "it watches (e.g. 'bbox/AP').")
    metric = opts["BEST_METRIC"]
    if not isinstance(metric, str):
        raise ConfigError(f"PERSIST.BEST_METRIC must be a metric's name, not {metric!r}.")
    if metric in TRAINING_VALUES or metric.startswith(TRAINING_PREFIXES):
        raise ConfigError(
            f"PERSIST.BEST_METRIC {metric!r} is a value of training logged every iteration, "
            "not an evaluation's result: name one (e.g. 'bbox/AP', 'segm/AP', "
            "'validation/total_loss' with PERSIST.VAL_LOSS).")
    if metric.startswith("validation/") and not opts["VAL_LOSS"]:
        raise ConfigError(f"PERSIST.BEST_METRIC {metric!r} is computed with PERSIST.VAL_LOSS "
                          "True only.")
    decay, warmup = opts["EMA_DECAY"], opts["EMA_WARMUP"]
    opts["EMA_DECAY"] = _number(decay)
    if not 0 <= opts["EMA_DECAY"] < 1:  # also NaN
        raise ConfigError("PERSIST.EMA_DECAY must be a number in [0, 1) (0: off; e.g. 0.9998), "
                          f"not {decay!r}.")
    number = _number(warmup)
    if not (0 <= number < math.inf and number == int(number)):
        raise ConfigError("PERSIST.EMA_WARMUP must be a whole number of iterations >= 0 (0: "
                          f"none), not {warmup!r}.")
    opts["EMA_WARMUP"] = int(number)  # persist.yaml holds it as add_persist_config types it
    opts["STOP_SIGNALS"] = _signal_names(opts["STOP_SIGNALS"])
    opts["EXPORT_DIR"] = _export_dir(opts["EXPORT_DIR"])
    keep = _number(opts["MAX_TO_KEEP"])
    if not (0 <= keep < math.inf and keep == int(keep)):
        raise ConfigError("PERSIST.MAX_TO_KEEP must be a whole number of checkpoints >= 0 (0: "
                          f"all), not {opts['MAX_TO_KEEP']!r}.")
    opts["MAX_TO_KEEP"] = int(keep)
    minutes = opts["CHECKPOINT_MINUTES"]
    try:
        opts["CHECKPOINT_MINUTES"] = float(minutes)
    except (TypeError, ValueError):
        opts["CHECKPOINT_MINUTES"] = -1.0
    if not opts["CHECKPOINT_MINUTES"] >= 0:  # also NaN
        raise ConfigError(
            "PERSIST.CHECKPOINT_MINUTES must be a number of minutes >= 0 (0: off), not "
            f"{minutes!r}."
        )
    return opts


#: what detectron2's trainers log every iteration, which no evaluation reports
TRAINING_VALUES = ("total_loss", "lr", "time", "data_time", "eta_seconds")
#: ... and the prefixes of the rest (losses; the heads' and the RPN's statistics)
TRAINING_PREFIXES = ("loss_", "fast_rcnn/", "mask_rcnn/", "roi_head/", "rpn/")


def lazy_options_given(train: Any) -> Dict[str, Any]:
    """
    The d2persist options a LazyConfig's ``train`` section gives (its ``persist`` dict, in
    ``PERSIST``'s upper-case keys), ``MAX_TO_KEEP`` from ``train.checkpointer.max_to_keep``
    where ``persist`` does not set it (PeriodicCheckpointer's, which PersistHook replaces).

    Raises:
        ConfigError: ``train.persist`` is not a dict.
    """
    given = train.get("persist", None) or {}
    if not hasattr(given, "items"):
        raise ConfigError(f"train.persist must be a dict of d2persist's options, not {given!r}.")
    opts = {str(k).upper(): v for k, v in given.items()}
    keep = (train.get("checkpointer", None) or {}).get("max_to_keep", None)
    if keep is not None and "MAX_TO_KEEP" not in opts:
        opts["MAX_TO_KEEP"] = keep
    return opts


def _export_dir(value: Any) -> str:
    """
    ``PERSIST.EXPORT_DIR`` checked: a folder inside OUTPUT_DIR, given relative to it (the
    run's own files, or another folder, would be overwritten by the export's).
    """
    name = value if isinstance(value, str) else ""
    parts = name.replace("\\", "/").split("/")
    if (not name.strip() or os.path.isabs(name) or ".." in parts
            or all(p in ("", ".") for p in parts)):
        raise ConfigError("PERSIST.EXPORT_DIR must be a folder inside OUTPUT_DIR, relative to "
                          f"it (e.g. 'export'), not {value!r}: the export's files would "
                          "overwrite the run's own or another folder's.")
    return name


def _number(value: Any) -> float:
    """``value`` as a float; NaN for what is not a number (booleans included)."""
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _flag(opts: Dict[str, Any], key: str) -> bool:
    """The boolean option ``key``; anything but True or False is refused in one sentence."""
    value = opts[key]
    if not isinstance(value, bool):
        raise ConfigError(f"PERSIST.{key} must be True or False, not {value!r}.")
    return value


def _signal_names(names: Union[str, Sequence[str]]) -> List[str]:
    """``PERSIST.STOP_SIGNALS`` checked: names of signals this system has, e.g. "SIGUSR1"."""
    import signal

    if isinstance(names, str):
        names = [names]
    out, seen = [], set()
    for name in names:
        name = str(name).strip().upper()
        name = name if name.startswith("SIG") else "SIG" + name
        sig = getattr(signal, name, None)
        if not isinstance(sig, signal.Signals) or name.startswith("SIG_") or sig in (
            signal.SIGKILL, getattr(signal, "SIGSTOP", signal.SIGKILL)
        ):
            raise ConfigError(
                f"PERSIST.STOP_SIGNALS holds {name!r}, which is not a signal a process can "
                "handle here: use names such as 'SIGTERM', 'SIGINT', 'SIGUSR1'."
            )
        if sig not in seen:  # an alias (SIGIOT for SIGABRT) or a repeat counts once
            seen.add(sig)
            out.append(name)
    return out


def check_extension_names(names: Sequence[str]) -> List[str]:
    """
    Check ``PERSIST.CONFIG_EXTENSIONS`` entries: each must be ``"module:add_*config"``.

    The names are also read back from artifacts (a predictor imports the module and calls the
    function), so only functions named like detectron2's ``add_*_config`` are accepted.

    Raises:
        ConfigRoundTripError: naming the entry that is not of that form.
    """
    names = list(names or [])
    for name in names:
        if not isinstance(name, str) or not _EXTENSION.match(name):
            raise ConfigRoundTripError(
                f"PERSIST.CONFIG_EXTENSIONS entry {name!r} is not of the form "
                "'module:add_*config' (e.g. 'point_rend:add_pointrend_config')."
            )
    return names


def _reference_cfg(extensions):
    """``get_cfg()`` with d2persist's and the listed projects' keys added."""
    from detectron2.config import get_cfg

    ref = add_persist_config(get_cfg())
    for name in check_extension_names(extensions):
        module, _, func = name.partition(":")
        try:
            getattr(importlib.import_module(module), func)(ref)
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigRoundTripError(
                f"PERSIST.CONFIG_EXTENSIONS entry {name!r} is not an importable "
                f"'module:function' ({e})."
            ) from None
    return ref


def _merge(cfg, data, new_allowed=False):
    from detectron2.config import CfgNode

    if new_allowed:
        cfg.set_new_allowed(True)
    cfg.merge_from_other_cfg(CfgNode(data))
    return cfg


def load_config_dict(data: dict, extensions: Sequence[str] = (),
                     new_allowed: bool = False) -> "CfgNode":
    """
    Merge a config dict read from YAML into ``get_cfg()`` (plus d2persist's and extensions'
    keys). Nothing in ``data`` is executed: it comes from a safe loader.

    Args:
        data (dict): the YAML content.
        extensions (list[str]): ``"module:add_*config"`` names to apply first.
        new_allowed (bool): accept keys no ``add_*_config`` defined (for prediction, where only
            the model-building keys matter).

    Returns:
        CfgNode
    """
    return _merge(_reference_cfg(extensions), data, new_allowed)


def flatten_config(d: Optional[dict], prefix: str = "") -> Dict[str, Any]:
    """
    A nested config dict as ``{"MODEL.ROI_HEADS.NUM_CLASSES": 3, ...}``: the one flattening
    that the round-trip check and ``d2persist diff`` share. Sequences become lists (YAML has no
    tuples), so equal values compare equal; an empty dict is a value.
    """
    out: Dict[str, Any] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = _as_lists(v)
    return out


def _as_lists(v):
    """YAML has no tuples: compare sequences as nested lists."""
    return [_as_lists(x) for x in v] if isinstance(v, (list, tuple)) else v


def _non_yaml_keys(cfg, prefix=""):
    from detectron2.config import CfgNode

    ok = (str, int, float, bool, type(None))
    bad = []
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, CfgNode):
            bad += _non_yaml_keys(v, key + ".")
        elif isinstance(v, (list, tuple)):
            if not all(isinstance(x, ok) or _nested_ok(x, ok) for x in v):
                bad.append(key)
        elif not isinstance(v, ok):
            bad.append(key)
    return bad


def _nested_ok(x, ok):
    return isinstance(x, (list, tuple)) and all(isinstance(y, ok) or _nested_ok(y, ok) for y in x)


def _plain(value: Any) -> Any:
    """``value`` with OmegaConf's containers (a LazyConfig's lists) as plain lists and dicts."""
    if isinstance(value, str):
        return value
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


class RunConfig:
    """
    The facts about a run that d2persist needs from its config (see :func:`run_config`).

    Attributes:
        cfg: the config (a LazyConfig is copied, without the objects a loop put in it).
        options (dict): d2persist's options, defaults filled in (:func:`persist_options`).
        kind (str): "yacs" or "lazy", as recorded in an export's manifest.
    """

    kind = ""
    #: the config's own names of the output folder, the iterations, the checkpoint period and
    #: the seed (for sentences)
    OUTPUT_DIR_KEY = "OUTPUT_DIR"
    MAX_ITER_KEY = "SOLVER.MAX_ITER"
    PERIOD_KEY = "SOLVER.CHECKPOINT_PERIOD"
    SEED_KEY = "SEED"

    def __init__(self, cfg: Union["CfgNode", "DictConfig"]) -> None:
        self.cfg = cfg
        self.options = persist_options(cfg)
        self._text: Optional[str] = None  # config.yaml, once checked

    def check_settings(self) -> None:
        """
        Refuse, before anything is built, what no run can train with: no output folder (or a
        file in its place), fewer than one iteration, a negative checkpoint period.

        Raises:
            ConfigError: naming the setting, in the config's own keys.
        """
        out, iters, period = self.OUTPUT_DIR_KEY, self.MAX_ITER_KEY, self.PERIOD_KEY
        for key, read in ((iters, lambda: self.max_iter), (period, lambda: self.checkpoint_period),
                          (self.SEED_KEY, lambda: self.seed)):
            try:
                read()
            except (TypeError, ValueError, OverflowError) as e:
                raise ConfigError(f"{key} must be a whole number ({e}).") from None
        if not str(self.output_dir or "").strip():
            raise ConfigError(f"{out} is empty: name the folder the run writes.")
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise ConfigError(f"{out} {self.output_dir} is a file, not a folder.")
        if self.max_iter < 1:
            raise ConfigError(f"{iters} must be a number of iterations >= 1, not "
                              f"{self.max_iter}.")
        if self.checkpoint_period < 0:
            raise ConfigError(f"{period} must be a number of iterations >= 0 (0: no periodic "
                              f"checkpoints), not {self.checkpoint_period}.")

    # -- where and how often -----------------------------------------------------------------
    @property
    def output_dir(self) -> str:
        raise NotImplementedError

    @property
    def checkpoint_period(self) -> int:
        raise NotImplementedError

    @property
    def max_iter(self) -> int:
        raise NotImplementedError

    @property
    def seed(self) -> int:
        """The run's seed (-1: random)."""
        raise NotImplementedError

    @property
    def cudnn_benchmark(self) -> bool:
        raise NotImplementedError

    @property
    def evaluates(self) -> bool:
        """Whether the run is configured to evaluate (test datasets / an evaluator)."""
        raise NotImplementedError

    @property
    def eval_period(self) -> int:
        """Evaluate after every this many iterations (0: only when training completes)."""
        raise NotImplementedError

    @property
    def export_dir(self) -> str:
        return os.path.join(self.output_dir, self.options["EXPORT_DIR"])

    # -- what the model is -------------------------------------------------------------------
    def train_dataset_names(self) -> List[str]:
        """Names of the training datasets."""
        raise NotImplementedError

    def test_dataset_name(self) -> Optional[str]:
        """The first test dataset (the one the export is evaluated on), or None."""
        raise NotImplementedError

    def build_evaluator(self, trainer: "TrainerBase",
                        dataset_name: str) -> Optional["DatasetEvaluator"]:
        """The evaluator the run's evaluation uses for ``dataset_name``, or None if it has none."""
        raise NotImplementedError

    def build_validation_mapper(self) -> Callable[[dict], dict]:
        """
        What ``PERSIST.VAL_LOSS`` maps a test image with: detectron2's training mapper
        (annotations kept; yacs: ``DatasetMapper(cfg, is_train=True)``, not a project's own;
        LazyConfig: ``dataloader.train.mapper``) with the test-time augmentations instead of the
        training ones.
        """
        raise NotImplementedError

    def validation_workers(self) -> int:
        """Data-loading worker processes of the validation loss (the test loader's)."""
        raise NotImplementedError

    @property
    def device(self) -> str:
        """Where the model trains (and the PyTorch bundle is evaluated)."""
        raise NotImplementedError

    def input_contract(self) -> Dict[str, Any]:
        """
        The input the model expects and the outputs it gives: ``format``, ``pixel_mean``,
        ``pixel_std``, ``min_size_test``, ``max_size_test``, ``meta_architecture``, ``outputs``.
        """
        raise NotImplementedError

    # -- config.yaml -------------------------------------------------------------------------
    def check(self) -> None:
        """
        Check, before training starts, that the config can be saved and loaded back; the
        checked text is kept, and later calls and :meth:`write` reuse it.

        Raises:
            ConfigRoundTripError: naming the keys at fault.
            ConfigError: a setting no run can train with (:meth:`check_settings`), or
                PERSIST.BEST_METRIC without any evaluation configured.
        """
        self.check_settings()
        self._check_best()
        self.dump()

    def _check_best(self):
        if self.options["VAL_LOSS"] and self.test_dataset_name() is None:
            raise ConfigError(
                "PERSIST.VAL_LOSS needs a test dataset to compute the loss on, and this run has "
                "none: set DATASETS.TEST (LazyConfig: dataloader.test)."
            )
        metric = self.options["BEST_METRIC"]
        if metric and not self.evaluates:
            raise ConfigError(
                f"PERSIST.BEST_METRIC {metric!r} needs an evaluation, and this run has none: set "
                "DATASETS.TEST (LazyConfig: dataloader.evaluator), and TEST.EVAL_PERIOD "
                "(train.eval_period) to evaluate during training."
            )
        patience, period, max_iter = (self.options["EARLY_STOP_PATIENCE"], self.eval_period,
                                      self.max_iter)
        if patience and not 0 < period < max_iter:  # EvalHook would evaluate only at the end
            when = "only when training ends" if period <= 0 else (
                f"every {period} iterations, not once before MAX_ITER {max_iter}")
            raise ConfigError(
                f"PERSIST.EARLY_STOP_PATIENCE {patience} watches evaluations during training, "
                f"and this run evaluates {when}: set TEST.EVAL_PERIOD (LazyConfig: "
                "train.eval_period) below the number of iterations.")

    def dump(self) -> str:
        """
        The config as YAML text that loads back to the same values.

        Raises:
            ConfigRoundTripError: the YAML would not load back to the same values.
        """
        if self._text is None:
            self._text = self._dump_checked()
        return self._text

    def _dump_checked(self):
        raise NotImplementedError

    def write(self, folder: str) -> None:
        """
        Write ``config.yaml`` and ``persist.yaml`` (the options, in ``PERSIST``'s keys for
        either kind: what readers of the run take them from) into ``folder``, atomically.
        """
        write_text(os.path.join(folder, CONFIG_NAME), self.dump())
        self._write_options(folder)

    def persist_yaml(self) -> str:
        """d2persist's own options, written next to config.yaml as persist.yaml."""
        return yaml.safe_dump({PERSIST_KEY: _plain(self.options)}, sort_keys=True)

    def _write_options(self, folder: str) -> None:
        write_text(os.path.join(folder, PERSIST_FILE), self.persist_yaml())

    def export_config_text(self, weights_name: str) -> str:
        """
        The config of an export bundle: the run's, with the weights set to ``weights_name`` and
        the output folder to the bundle (both relative, so the bundle can move).
        """
        raise NotImplementedError


class YacsRunConfig(RunConfig):
    """A run configured by a yacs ``CfgNode`` (``get_cfg()`` plus projects' keys)."""

    kind = "yacs"

    @property
    def output_dir(self) -> str:
        return self.cfg.OUTPUT_DIR

    @property
    def checkpoint_period(self) -> int:
        return int(self.cfg.SOLVER.CHECKPOINT_PERIOD)

    @property
    def max_iter(self) -> int:
        return int(self.cfg.SOLVER.MAX_ITER)

    @property
    def seed(self) -> int:
        return int(self.cfg.SEED)

    @property
    def cudnn_benchmark(self) -> bool:
        return bool(self.cfg.CUDNN_BENCHMARK)

    @property
    def evaluates(self) -> bool:
        return len(self.cfg.DATASETS.TEST) > 0

    @property
    def eval_period(self) -> int:
        return int(self.cfg.TEST.EVAL_PERIOD)

    def train_dataset_names(self) -> List[str]:
        return list(self.cfg.DATASETS.TRAIN)

    def test_dataset_name(self) -> Optional[str]:
        return self.cfg.DATASETS.TEST[0] if len(self.cfg.DATASETS.TEST) else None

    def build_evaluator(self, trainer: "TrainerBase",
                        dataset_name: str) -> Optional["DatasetEvaluator"]:
        build = getattr(trainer, "build_evaluator", None)  # a classmethod (trainer: a proxy)
        if build is None:
            return None
        try:  # as DefaultTrainer.test builds it
            return build(self.cfg, dataset_name)
        except NotImplementedError:
            return None

    def build_validation_mapper(self) -> Callable[[dict], dict]:
        from detectron2.data import DatasetMapper
        from detectron2.data.detection_utils import build_augmentation

        return DatasetMapper(self.cfg, is_train=True,
                             augmentations=build_augmentation(self.cfg, is_train=False))

    def validation_workers(self) -> int:
        return int(self.cfg.DATALOADER.NUM_WORKERS)

    @property
    def device(self) -> str:
        return str(self.cfg.MODEL.DEVICE)

    def input_contract(self) -> Dict[str, Any]:
        cfg = self.cfg
        arch = cfg.MODEL.META_ARCHITECTURE
        outputs = []
        if arch in ("GeneralizedRCNN", "RetinaNet", "PanopticFPN") or "RCNN" in arch:
            outputs.append("boxes")
            if cfg.MODEL.MASK_ON:
                outputs.append("masks")
            if cfg.MODEL.KEYPOINT_ON:
                outputs.append("keypoints")
        if arch in ("SemanticSegmentor", "PanopticFPN"):
            outputs.append("sem_seg")
        if arch == "PanopticFPN":
            outputs.append("panoptic_seg")
        return {
            "format": cfg.INPUT.FORMAT,
            "min_size_test": int(cfg.INPUT.MIN_SIZE_TEST),
            "max_size_test": int(cfg.INPUT.MAX_SIZE_TEST),
            "pixel_mean": [float(x) for x in cfg.MODEL.PIXEL_MEAN],
            "pixel_std": [float(x) for x in cfg.MODEL.PIXEL_STD],
            "meta_architecture": arch,
            "outputs": outputs,
        }

    def _without_persist(self):
        c = self.cfg.clone()
        c.defrost()
        c.pop(PERSIST_KEY, None)
        return c

    def _dump_checked(self):
        """The text loads with a plain ``get_cfg().merge_from_file`` (PERSIST left out)."""
        cfg = self._without_persist()
        bad = _non_yaml_keys(cfg)
        if bad:
            raise ConfigRoundTripError(
                "config.yaml cannot hold these keys, whose values are not YAML-serializable: "
                f"{', '.join(bad)}."
            )
        text = cfg.dump()
        self._check_round_trip(cfg, text)
        return text

    def _check_round_trip(self, cfg, text):
        ref = _reference_cfg(self.options["CONFIG_EXTENSIONS"])
        data = yaml.safe_load(text)
        known = flatten_config(ref)
        unknown = sorted(k for k in flatten_config(data) if k not in known)
        if unknown:
            raise ConfigRoundTripError(
                "config.yaml would not load back with get_cfg(): these keys are defined only by "
                f"your project's add_*_config: {', '.join(unknown)}. List that function in "
                "cfg.PERSIST.CONFIG_EXTENSIONS as 'module:function'."
            )
        loaded = flatten_config(_merge(ref, data))
        want = flatten_config(cfg)
        differ = sorted(k for k in want if loaded.get(k) != want[k])
        if differ:
            raise ConfigRoundTripError(
                f"config.yaml would not load back to the same values for: {', '.join(differ)}."
            )

    def export_config_text(self, weights_name: str) -> str:
        cfg = self._without_persist()
        cfg.MODEL.WEIGHTS = weights_name
        cfg.OUTPUT_DIR = "."
        return cfg.dump()


def save_lazy_config(cfg: "DictConfig", path: str) -> None:
    """
    ``LazyConfig.save(cfg, path)``, made atomic: saved under a temporary name in the same
    folder, fsync'ed, then renamed (with the ``.pkl`` fallback file, if detectron2 wrote one).
    """
    from detectron2.config import LazyConfig

    with atomic_path(path) as tmp:
        try:
            LazyConfig.save(cfg, tmp)
            if os.path.exists(tmp + ".pkl"):  # detectron2's fallback for what YAML cannot hold
                with atomic_path(path + ".pkl") as tmp_pkl:
                    os.replace(tmp + ".pkl", tmp_pkl)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp + ".pkl")


def _lazy_text(cfg):
    """The YAML ``LazyConfig.save`` writes for ``cfg``, checked to load with a safe loader."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, CONFIG_NAME)
        save_lazy_config(cfg, path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        pickled = os.path.exists(path + ".pkl")
    try:
        safe_yaml_loads(text)
    except yaml.YAMLError:
        pickled = True
    if pickled:
        raise ConfigRoundTripError(
            "The LazyConfig holds objects YAML cannot represent (lambdas, instances); make them "
            "LazyCall()s or plain values so the model can be rebuilt without unpickling."
        )
    return text


def target_name(target):
    if isinstance(target, str):
        return target
    return f"{target.__module__}.{target.__qualname__}"


#: PIL's bilinear resampling (``Image.BILINEAR``), ResizeShortestEdge's default ``interp``
_BILINEAR = 2


def lazy_image_format(cfg: Any) -> str:
    """
    The channel order a LazyConfig's evaluation reads images in: its test loader's
    ``mapper.image_format`` (what ``DatasetMapper`` reads them with; the zoo's configs
    interpolate the training loader's), else ``model.input_format`` (which only visualizers
    read), else "BGR".
    """
    from omegaconf import OmegaConf

    try:
        fmt = OmegaConf.select(cfg, "dataloader.test.mapper.image_format", default=None)
    except Exception:  # omegaconf raises several kinds for an interpolation that fails
        fmt = None
    if fmt is None:
        fmt = OmegaConf.select(cfg, "model.input_format", default=None) or "BGR"
    return str(fmt)


def lazy_test_augmentations(cfg):
    """A LazyConfig's ``dataloader.test.mapper.augmentations`` ([] if it has none)."""
    try:
        return cfg.dataloader.test.mapper.augmentations
    except Exception:  # omegaconf raises several kinds for a missing path
        return []


class LazyRunConfig(RunConfig):
    """
    A run configured by a LazyConfig. Its ``config.yaml`` is what ``LazyConfig.save`` writes;
    with EXPORT on it must load with a safe loader (the export rebuilds the model from it
    without unpickling), otherwise detectron2's pickle fallback is allowed.
    """

    kind = "lazy"
    OUTPUT_DIR_KEY = "train.output_dir"
    MAX_ITER_KEY = "train.max_iter"
    PERIOD_KEY = "train.checkpointer.period"
    SEED_KEY = "train.seed"

    def __init__(self, cfg: "DictConfig") -> None:
        super().__init__(cfg)
        self.cfg = _lazy_snapshot(cfg)

    @property
    def output_dir(self) -> str:
        return self.cfg.train.output_dir

    @property
    def checkpoint_period(self) -> int:
        from omegaconf import OmegaConf

        return int(OmegaConf.select(self.cfg, "train.checkpointer.period", default=0) or 0)

    @property
    def max_iter(self) -> int:
        return int(self.cfg.train.max_iter)

    @property
    def seed(self) -> int:
        return int(self.cfg.train.get("seed", -1))

    @property
    def cudnn_benchmark(self) -> bool:
        return bool(self.cfg.train.get("cudnn_benchmark", False))

    @property
    def evaluates(self) -> bool:
        return "evaluator" in self.cfg.get("dataloader", {})

    @property
    def eval_period(self) -> int:
        return int(self.cfg.train.get("eval_period", 0))

    def train_dataset_names(self) -> List[str]:
        try:
            names = self.cfg.dataloader.train.dataset.names
        except Exception:  # omegaconf raises several kinds for a missing path
            return []
        return [names] if isinstance(names, str) else list(names)

    def test_dataset_name(self) -> Optional[str]:
        try:
            names = self.cfg.dataloader.test.dataset.names
        except Exception:  # omegaconf raises several kinds for a missing path
            return None
        names = [names] if isinstance(names, str) else list(names)
        return names[0] if names else None

    def build_evaluator(self, trainer: "TrainerBase",
                        dataset_name: str) -> Optional["DatasetEvaluator"]:
        from detectron2.config import instantiate

        if not self.evaluates:
            return None
        evaluator = instantiate(self.cfg.dataloader.evaluator)
        if isinstance(evaluator, MutableSequence):  # a list (the zoo's panoptic data config):
            from detectron2.evaluation import DatasetEvaluators  # as inference_on_dataset

            evaluator = DatasetEvaluators(list(evaluator))
        return evaluator

    def build_validation_mapper(self) -> Callable[[dict], dict]:
        from detectron2.config import instantiate

        mapper = copy.deepcopy(self.cfg.dataloader.train.mapper)
        mapper.augmentations = copy.deepcopy(lazy_test_augmentations(self.cfg))
        return instantiate(mapper)

    def validation_workers(self) -> int:
        try:
            return int(self.cfg.dataloader.test.get("num_workers", 0))
        except Exception:  # omegaconf raises several kinds for a missing path
            return 0

    @property
    def device(self) -> str:
        return str(self.cfg.train.get("device", "cpu"))

    def input_contract(self) -> Dict[str, Any]:
        model = self.cfg.model
        contract: Dict[str, Any] = {
            "format": lazy_image_format(self.cfg),
            "pixel_mean": [float(x) for x in model.get("pixel_mean", [])],
            "pixel_std": [float(x) for x in model.get("pixel_std", [])],
            "meta_architecture": target_name(model._target_).rsplit(".", 1)[-1],
            "outputs": [],
        }
        for aug in lazy_test_augmentations(self.cfg):
            name = target_name(aug._target_)
            if name.endswith("ResizeShortestEdge"):
                size = aug.short_edge_length
                sizes = [size] if isinstance(size, int) else list(size)
                contract["min_size_test"] = int(sizes[0])
                contract["max_size_test"] = int(aug.get("max_size", sys.maxsize))
                interp = aug.get("interp", None)
                if len(set(sizes)) > 1 or interp not in (None, _BILINEAR):  # the graph's
                    # resize is one size, bilinear: the ONNX export refuses another
                    contract.setdefault("other_test_augmentations", []).append(
                        f"{name} of sizes {sizes} with interp {interp}")
            else:  # applied by the PyTorch predictor; the ONNX export refuses them
                contract.setdefault("other_test_augmentations", []).append(name)
        roi = model.get("roi_heads") or {}
        if "proposal_generator" in model or "head" in model:
            contract["outputs"].append("boxes")
        if roi.get("mask_head") is not None:
            contract["outputs"].append("masks")
        if roi.get("keypoint_head") is not None:
            contract["outputs"].append("keypoints")
        if model.get("sem_seg_head") is not None:  # SemanticSegmentor, PanopticFPN
            contract["outputs"].append("sem_seg")
        if contract["meta_architecture"] == "PanopticFPN":
            contract["outputs"].append("panoptic_seg")
        return contract

    def check(self) -> None:
        """Checked only with EXPORT on; without it, config.yaml may use the pickle fallback."""
        self.check_settings()
        self._check_best()
        if self.options["EXPORT"]:
            self.dump()

    def _dump_checked(self):
        return _lazy_text(self.cfg)

    def write(self, folder: str) -> None:
        if self._text is None:  # unchecked: the pickle fallback is allowed
            save_lazy_config(self.cfg, os.path.join(folder, CONFIG_NAME))
            self._write_options(folder)
        else:
            super().write(folder)

    def export_config_text(self, weights_name: str) -> str:
        cfg = copy.deepcopy(self.cfg)
        cfg.train.init_checkpoint = weights_name
        cfg.train.output_dir = "."
        return _lazy_text(cfg)


def _lazy_snapshot(cfg):
    """
    A copy of a LazyConfig as a config, without the runtime objects a training loop put in it
    (detectron2's loop sets ``optimizer.params.model`` to the model itself).
    """
    import torch

    params = cfg.get("optimizer", {}).get("params") or {}
    model = params.get("model")
    if isinstance(model, torch.nn.Module):
        params.model = None
        try:
            return copy.deepcopy(cfg)
        finally:
            params.model = model
    return copy.deepcopy(cfg)


def run_config(cfg: Union["CfgNode", "DictConfig"]) -> RunConfig:
    """
    The :class:`RunConfig` of a config.

    Args:
        cfg: a ``CfgNode`` (``cfg.PERSIST`` optional) or a LazyConfig.

    Raises:
        ConfigRoundTripError: an unknown d2persist option, or a malformed CONFIG_EXTENSIONS.
    """
    return LazyRunConfig(cfg) if _is_lazy(cfg) else YacsRunConfig(cfg)
