"""
One view of a run's config, whether a yacs ``CfgNode`` or a LazyConfig (``DictConfig``).

The hook asks it *where* (output folder), *how often* (checkpoint period, max iteration) and
*what* to write for the config; it also checks that what it writes loads back.
"""

import importlib
import logging
import os

import yaml

from .config import PERSIST_KEY, add_persist_config
from .errors import ConfigRoundTripError

__all__ = [
    "RunConfig",
    "persist_options",
    "load_config_dict",
    "DEFAULT_OPTIONS",
    "PERSIST_FILE",
]

logger = logging.getLogger(__name__)

#: d2persist's own options of a yacs run, kept out of config.yaml so stock code loads that.
PERSIST_FILE = "persist.yaml"

#: cfg.PERSIST's defaults, for a config that never called add_persist_config.
DEFAULT_OPTIONS = {
    "MAX_TO_KEEP": 0,
    "EXPORT": True,
    "EXPORT_DIR": "export",
    "ASYNC": True,
    "SAVE_ON_INTERRUPT": True,
    "CONFIG_EXTENSIONS": [],
}


def _is_lazy(cfg):
    from omegaconf import DictConfig

    return isinstance(cfg, DictConfig)


def persist_options(cfg):
    """
    d2persist's options of a config, defaults filled in.

    yacs configs keep them in ``cfg.PERSIST`` (:func:`add_persist_config`); LazyConfigs in an
    optional ``train.persist`` dict with the same keys in lower case.
    """
    opts = dict(DEFAULT_OPTIONS)
    if _is_lazy(cfg):
        given = cfg.train.get("persist", None) or {}
        opts.update({str(k).upper(): v for k, v in dict(given).items()})
    elif PERSIST_KEY in cfg:
        opts.update(dict(cfg[PERSIST_KEY]))
    unknown = set(opts) - set(DEFAULT_OPTIONS)
    if unknown:
        raise ConfigRoundTripError(f"Unknown d2persist option(s): {', '.join(sorted(unknown))}.")
    return opts


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = _as_lists(v)
    return out


def _as_lists(v):
    """YAML has no tuples: compare sequences as nested lists."""
    return [_as_lists(x) for x in v] if isinstance(v, (list, tuple)) else v


def _without_persist(cfg):
    c = cfg.clone()
    c.defrost()
    c.pop(PERSIST_KEY, None)
    return c


def _reference_cfg(extensions):
    """``get_cfg()`` with d2persist's and the listed projects' keys added."""
    from detectron2.config import get_cfg

    ref = add_persist_config(get_cfg())
    for name in extensions:
        module, _, func = name.partition(":")
        try:
            getattr(importlib.import_module(module), func)(ref)
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigRoundTripError(
                f"PERSIST.CONFIG_EXTENSIONS entry {name!r} is not an importable "
                f"'module:function' ({e})."
            ) from None
    return ref


def load_config_dict(data, extensions=(), new_allowed=False):
    """
    Merge a config dict read from YAML into ``get_cfg()`` (plus d2persist's and extensions'
    keys). Nothing is executed: ``data`` comes from a safe loader.

    Args:
        data (dict): the YAML content.
        extensions (list[str]): "module:function" names of ``add_*_config`` to apply first.
        new_allowed (bool): accept keys no ``add_*_config`` defined (for prediction, where only
            the model-building keys matter).
    """
    return _merge(_reference_cfg(extensions), data, new_allowed)


def _merge(cfg, data, new_allowed=False):
    from detectron2.config import CfgNode

    if new_allowed:
        cfg.set_new_allowed(True)
    cfg.merge_from_other_cfg(CfgNode(data))
    return cfg


class RunConfig:
    """The facts about a run that d2persist needs from its config."""

    def __init__(self, cfg):
        self.is_lazy = _is_lazy(cfg)
        self.cfg = _lazy_snapshot(cfg) if self.is_lazy else cfg
        self.options = persist_options(cfg)
        self._text = None  # config.yaml, once checked

    @property
    def output_dir(self):
        return self.cfg.train.output_dir if self.is_lazy else self.cfg.OUTPUT_DIR

    @property
    def checkpoint_period(self):
        if self.is_lazy:
            return int(self.cfg.train.checkpointer.period)
        return int(self.cfg.SOLVER.CHECKPOINT_PERIOD)

    @property
    def max_iter(self):
        return int(self.cfg.train.max_iter if self.is_lazy else self.cfg.SOLVER.MAX_ITER)

    @property
    def seed(self):
        """The run's seed (-1: random)."""
        return int(self.cfg.train.get("seed", -1) if self.is_lazy else self.cfg.SEED)

    @property
    def cudnn_benchmark(self):
        if self.is_lazy:
            return bool(self.cfg.train.get("cudnn_benchmark", False))
        return bool(self.cfg.CUDNN_BENCHMARK)

    @property
    def export_dir(self):
        return os.path.join(self.output_dir, self.options["EXPORT_DIR"])

    def check(self):
        """
        Check, before training starts, that the config can be saved and loaded back. A
        LazyConfig is checked only with EXPORT on (the export must rebuild the model without
        unpickling); without it, config.yaml may use detectron2's pickle fallback. The checked
        text is kept: later calls and :meth:`write` reuse it.

        Raises:
            ConfigRoundTripError: naming the keys at fault.
        """
        if not self.is_lazy or self.options["EXPORT"]:
            self.dump()

    def dump(self):
        """
        The config as YAML text that loads back to the same values: with a plain
        ``get_cfg().merge_from_file`` (the PERSIST node is left out, see :meth:`persist_yaml`),
        or for a LazyConfig, with a safe YAML loader.

        Raises:
            ConfigRoundTripError: the YAML would not load back to the same values.
        """
        if self._text is None:
            if self.is_lazy:
                from .lazy import lazy_config_text

                self._text = lazy_config_text(self.cfg)
            else:
                self._text = self._dump_checked()
        return self._text

    def _dump_checked(self):
        cfg = _without_persist(self.cfg)
        bad = _non_yaml_keys(cfg)
        if bad:
            raise ConfigRoundTripError(
                "config.yaml cannot hold these keys, whose values are not YAML-serializable: "
                f"{', '.join(bad)}."
            )
        text = cfg.dump()
        self._check_round_trip(cfg, text)
        return text

    def write(self, folder, name):
        """Write the config into ``folder`` (atomically): ``name``, plus persist.yaml (yacs)."""
        from .fileio import write_text

        path = os.path.join(folder, name)
        if self.is_lazy and self._text is None:  # unchecked: the pickle fallback is allowed
            from .lazy import save_lazy_config

            save_lazy_config(self.cfg, path)
            return
        write_text(path, self.dump())
        if not self.is_lazy:
            write_text(os.path.join(folder, PERSIST_FILE), self.persist_yaml())

    def export_config_text(self, weights_name):
        """
        The config of an export bundle: the run's, with MODEL.WEIGHTS (LazyConfig:
        train.init_checkpoint) set to ``weights_name`` and the output folder to the bundle.
        """
        if self.is_lazy:
            from .lazy import export_lazy_config

            return export_lazy_config(self.cfg, weights_name)
        cfg = _without_persist(self.cfg)
        cfg.MODEL.WEIGHTS = weights_name
        cfg.OUTPUT_DIR = "."
        return cfg.dump()

    def persist_yaml(self):
        """d2persist's own options, written next to config.yaml as persist.yaml."""
        return yaml.safe_dump({PERSIST_KEY: self.options}, sort_keys=True)

    def _check_round_trip(self, cfg, text):
        ref = _reference_cfg(list(self.options["CONFIG_EXTENSIONS"]))
        data = yaml.safe_load(text)
        known = _flatten(ref)
        unknown = sorted(k for k in _flatten(data) if k not in known)
        if unknown:
            raise ConfigRoundTripError(
                "config.yaml would not load back with get_cfg(): these keys are defined only by "
                f"your project's add_*_config: {', '.join(unknown)}. List that function in "
                "cfg.PERSIST.CONFIG_EXTENSIONS as 'module:function'."
            )
        loaded = _flatten(_merge(ref, data))
        want = _flatten(cfg)
        differ = sorted(k for k in want if loaded.get(k) != want[k])
        if differ:
            raise ConfigRoundTripError(
                f"config.yaml would not load back to the same values for: {', '.join(differ)}."
            )


def _lazy_snapshot(cfg):
    """
    A copy of a LazyConfig as a config, without the runtime objects a training loop put in it
    (detectron2's loop sets ``optimizer.params.model`` to the model itself).
    """
    import copy

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
