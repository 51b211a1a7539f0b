"""
Rebuild a model from an artifact's safe-loaded config, and load its weights strictly.

A yacs config is merged into ``get_cfg()`` (with the run's ``CONFIG_EXTENSIONS``, whose import
also registers a project's models). A LazyConfig is instantiated with ``_target_`` limited to
trusted modules: ``_target_`` names a callable to import and call, and from an untrusted file
that is code execution. Nothing here imports training code.
"""

import logging
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import torch

from ..artifacts.checkpoints import evaluated_weights
from ..errors import ArtifactError, UnsafeArtifactError
from ..files.safe_load import safe_torch_load
from ..runconfig import lazy_image_format, lazy_test_augmentations, load_config_dict, target_name

if TYPE_CHECKING:
    from detectron2.data.transforms import Augmentation

__all__ = ["DEFAULT_ALLOWED_TARGETS", "build_model_from_config", "load_weights"]

logger = logging.getLogger(__name__)

#: Module prefixes whose callables an artifact's LazyConfig may instantiate.
DEFAULT_ALLOWED_TARGETS = ("detectron2.modeling", "detectron2.layers", "detectron2.data.transforms",
                           "torch.nn")


def _inside(name, allowed):
    return isinstance(name, str) and any(name == p or name.startswith(p + ".") for p in allowed)


def _check_target(name, allowed, where):
    """
    ``name`` must lie under an allowed prefix, and so must the module that defines what it
    resolves to: a dotted path can walk through a module's imports
    (``torch.nn.parallel.distributed.os.system``), so the prefix alone proves nothing.
    """
    refusal = UnsafeArtifactError(
        f"Refusing to instantiate {name!r} (at {where}): the config may only call classes and "
        f"functions defined in {', '.join(allowed)}."
    )
    if not _inside(name, allowed):
        raise refusal
    from detectron2.utils.registry import locate

    try:
        obj = locate(name)  # imports only modules under the allowed prefix
    except Exception:  # locate raises ImportError or a bare Exception for an unknown name
        raise ArtifactError(f"The config names {name!r} (at {where}), which does not exist.") \
            from None
    if not (isinstance(obj, type) or callable(obj)) or not _inside(
        getattr(obj, "__module__", None), allowed
    ):
        raise refusal


def _check_targets(node, allowed, where="model"):
    """Refuse any ``_target_`` outside ``allowed`` modules, before anything is called."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None:
            _check_target(target_name(target), allowed, where)
        for k, v in node.items():
            _check_targets(v, allowed, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_targets(v, allowed, f"{where}[{i}]")


def _build_lazy(config, opts, allowed_targets):
    from detectron2.config import LazyConfig, instantiate
    from omegaconf import OmegaConf

    allowed = tuple(DEFAULT_ALLOWED_TARGETS) + tuple(allowed_targets or ())
    cfg = OmegaConf.create(config, flags={"allow_objects": True})
    if opts:
        try:
            LazyConfig.apply_overrides(cfg, list(opts))
        except Exception as e:  # omegaconf and hydra raise several kinds for a bad override
            raise ArtifactError(f"Config overrides {list(opts)} do not apply ({e}).") from None
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    augs_cfg = OmegaConf.to_container(
        OmegaConf.create({"a": lazy_test_augmentations(cfg)}), resolve=True
    )["a"]
    _check_targets(model_cfg, allowed)
    _check_targets(augs_cfg, allowed, "dataloader.test.mapper.augmentations")
    try:
        model = instantiate(OmegaConf.create(model_cfg))
        augs = [instantiate(OmegaConf.create(a)) for a in augs_cfg]
    except Exception as e:  # instantiate wraps whatever the callables raise
        raise ArtifactError(f"The LazyConfig's model cannot be built: {e}") from None
    return model, augs, lazy_image_format(cfg)


def _build_yacs(config, opts, extensions):
    from detectron2.data.detection_utils import build_augmentation
    from detectron2.modeling import build_model

    try:
        cfg = load_config_dict(config, extensions, new_allowed=True)
        if opts:
            cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as e:
        raise ArtifactError(f"The config does not load: {e}.") from None
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    try:
        model = build_model(cfg)
    except KeyError as e:  # fvcore's Registry: "No object named 'X' found in 'Y' registry!"
        if "registry" not in str(e):
            raise
        raise ArtifactError(
            f"The config names a model part that no imported module registers ({e.args[0]}): "
            "fix the name, or list an add_*config function of the module that registers it "
            "in PERSIST.CONFIG_EXTENSIONS (importing it registers the part).") from None
    return model, build_augmentation(cfg, is_train=False), cfg.INPUT.FORMAT


def build_model_from_config(
    config: dict,
    kind: str,
    opts: Optional[Sequence[str]] = None,
    allowed_targets: Optional[Sequence[str]] = None,
    extensions: Sequence[str] = (),
) -> Tuple[torch.nn.Module, List["Augmentation"], str]:
    """
    Build the model (on the CPU, weights not loaded) and test-time augmentations of a config.

    Args:
        config (dict): the config as read by a safe YAML loader.
        kind (str): "yacs" or "lazy".
        opts (list[str]): overrides: ``KEY VALUE`` pairs (yacs) or ``key=value`` (lazy).
        allowed_targets (list[str]): lazy only: module prefixes ``_target_`` may name, in
            addition to :data:`DEFAULT_ALLOWED_TARGETS`.
        extensions (list[str]): yacs only: ``"module:add_*config"`` functions to apply.

    Returns:
        tuple: (model, list of augmentations, input format)

    Raises:
        UnsafeArtifactError: a ``_target_`` outside the allowed modules.
        ArtifactError: the config does not build a model.
    """
    if kind == "lazy":
        return _build_lazy(config, opts, allowed_targets)
    return _build_yacs(config, opts, extensions)


def load_weights(model: torch.nn.Module, path: str) -> Optional[dict]:
    """
    Load a ``.safetensors`` or ``.pth`` weights file into ``model`` strictly and safely; of a
    checkpoint, the weights its run evaluated (its EMA average with ``PERSIST.EMA_EVAL``).

    Returns:
        dict or None: of a checkpoint, what it says of the weights loaded: ``iteration``, and
        ``ema`` (the average's ``decay``, ``warmup`` and ``updates``, or None); else None.

    Raises:
        ArtifactError: the file is corrupt, or its tensors do not fit the model (one sentence
            naming how many are missing, unexpected or of another shape).
        UnsafeArtifactError: a ``.pth`` holding more than tensors and plain data.
    """
    info = None
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise ArtifactError(f"Weights file {path} is corrupt ({e}).") from None
    else:
        state = safe_torch_load(path)
        if isinstance(state, dict):  # a checkpoint: the weights its run evaluated (EMA or not)
            iteration = state.get("iteration")
            state, ema = evaluated_weights(state)
            info = {"iteration": iteration if isinstance(iteration, int) else None, "ema": ema}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(
        getattr(state[k], "shape", ())))
    if missing or unexpected or wrong:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected),
                           ("of another shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {what} (e.g. {keys[0]})")
        raise ArtifactError(
            f"The weights in {path} do not fit the model its config builds: "
            f"{', '.join(parts)} tensors."
        )
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
    return info
