"""
``d2persist diff``: what two runs or bundles differ in (options, config, metrics, files),
read through the view.
"""

import logging
import os
from typing import Optional

from ..config import DEFAULT_OPTIONS
from ..errors import ConfigError, D2PersistError
from ..files.mirror import is_url
from ..files.safe_load import safe_yaml_load
from ..layout import PYTORCH
from ..runconfig import flatten_config, lazy_options_given
from .view import open_view

__all__ = ["describe", "diff"]

logger = logging.getLogger(__name__)


# -- diff -------------------------------------------------------------------------------------

def describe(path: str) -> dict:
    """
    What ``d2persist diff`` compares of a run folder, a bundle (here or at a URL) or a config
    file: ``config`` (flattened dotted keys), ``persist`` (d2persist's options), ``classes``,
    ``last_iteration`` and ``final`` (the last evaluation's metrics).

    Raises:
        D2PersistError: ``path`` is none of these, in one sentence.
    """
    if not is_url(path) and os.path.isfile(path):
        if not path.endswith((".yaml", ".yml")):
            raise D2PersistError(f"{path} is not a config file (.yaml), a run folder or a bundle.")
        config = safe_yaml_load(path)
        if not isinstance(config, dict):
            raise D2PersistError(f"{path} does not hold a config mapping.")
        if "_BASE_" in config:  # a yacs file on others (detectron2's model zoo's way)
            config = _with_bases(path)
        persist = config.pop("PERSIST", None) or {}
        if "MODEL" in config:  # a yacs file: onto get_cfg(), its options onto the defaults
            from ..runconfig import load_config_dict

            try:
                config = load_config_dict(config, new_allowed=True)
            except (KeyError, ValueError, AssertionError) as e:
                raise D2PersistError(f"{path} does not load as a detectron2 config ({e}).") \
                    from None
            config.pop("PERSIST", None)
            persist = dict(DEFAULT_OPTIONS, **persist) if isinstance(persist, dict) else persist
        train = _lazy_train(config)
        if train is not None:  # a LazyConfig's options, onto the defaults too
            try:
                persist = dict(DEFAULT_OPTIONS, **lazy_options_given(train))
            except ConfigError as e:
                raise D2PersistError(f"{path}: {e}") from None
            train.pop("persist", None)
        return {"kind": "config", "config": flatten_config(config), "persist": persist,
                "classes": None, "last_iteration": None, "final": {}}
    view = open_view(path)
    config = view.config()
    if config is not None and not isinstance(config, dict):
        raise D2PersistError(f"The config of {path} does not hold a config mapping.")
    train = _lazy_train(config)
    if train is not None:  # compared once: as the run's options (persist.yaml)
        train.pop("persist", None)
    if view.kind == "bundle":
        manifest = view.manifest()
        evaluation = manifest.get("evaluation") or {}
        return {"kind": "bundle", "config": flatten_config(config), "persist": {},
                "classes": view.classes(), "last_iteration": manifest.get("iteration"),
                "final": (evaluation.get("backends") or {}).get(PYTORCH.backend) or {}}
    evaluations = view.evaluations()
    return {"kind": "run", "config": flatten_config(config),
            "persist": view.persist_options(), "classes": view.classes(),
            "last_iteration": view.last_iteration(),
            "final": evaluations[max(evaluations)] if evaluations else {}}


def _lazy_train(config: Optional[dict]) -> Optional[dict]:
    """A LazyConfig's ``train`` section (where its options are), or None for another kind."""
    train = config.get("train") if isinstance(config, dict) and "model" in config else None
    return train if isinstance(train, dict) else None


def _with_bases(path: str) -> dict:
    """A yacs config file merged onto its ``_BASE_`` files, read safely (fvcore's merge)."""
    import yaml
    from fvcore.common.config import CfgNode

    try:
        return dict(CfgNode.load_yaml_with_base(path, allow_unsafe=False))
    except (OSError, yaml.YAMLError) as e:
        raise D2PersistError(f"{path} does not load with its _BASE_ ({type(e).__name__}: "
                             f"{' '.join(str(e).split())}).") from None


def diff(a: str, b: str) -> dict:
    """
    ``d2persist diff A B``: ``config`` and ``persist`` as ``{key: [a, b]}`` for the keys whose
    values differ (a side lacking the key holds None: added or removed), ``classes``,
    ``last_iteration`` and ``final`` of each side as ``[a, b]``.
    """
    sa, sb = describe(a), describe(b)

    def changed(x, y):
        return {k: [x.get(k), y.get(k)] for k in sorted(set(x) | set(y))
                if x.get(k, _MISSING) != y.get(k, _MISSING)}

    return {"kinds": [sa["kind"], sb["kind"]], "config": changed(sa["config"], sb["config"]),
            "persist": changed(flatten_config(sa["persist"]), flatten_config(sb["persist"])),
            "classes": [sa["classes"], sb["classes"]],
            "last_iteration": [sa["last_iteration"], sb["last_iteration"]],
            "final": [sa["final"], sb["final"]]}


_MISSING = object()
