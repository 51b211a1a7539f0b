"""
LazyConfig runs (``tools/lazyconfig_train_net.py``-style loops on SimpleTrainer/AMPTrainer).

Training side: save the config as detectron2 does (``LazyConfig.save``: YAML, with a
cloudpickle fallback for what YAML cannot hold), atomically; train with PersistHook in place
of ``PeriodicCheckpointer``. Prediction side: rebuild the model from the safe-loaded YAML with
``instantiate``, allowing only callables from trusted modules (``_target_`` names a callable to
import and call: from an untrusted file, that is code execution).
"""

import contextlib
import logging
import os
import tempfile

from .errors import ArtifactError, ConfigRoundTripError, UnsafeArtifactError
from .fileio import atomic_path

__all__ = [
    "DEFAULT_ALLOWED_TARGETS",
    "save_lazy_config",
    "lazy_config_text",
    "export_lazy_config",
    "lazy_input_contract",
    "lazy_train_dataset_names",
    "build_lazy_model",
    "train_lazy",
]

logger = logging.getLogger(__name__)

#: Module prefixes whose callables an artifact's LazyConfig may instantiate.
DEFAULT_ALLOWED_TARGETS = ("detectron2.modeling", "detectron2.layers", "detectron2.data.transforms",
                           "torch.nn")


def save_lazy_config(cfg, path):
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


def lazy_config_text(cfg):
    """
    The YAML ``LazyConfig.save`` writes for ``cfg``, checked to load with a safe loader.

    Raises:
        ConfigRoundTripError: the YAML needs Python objects to load.
    """
    import yaml

    from .fileio import safe_yaml_loads

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "config.yaml")
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


def export_lazy_config(cfg, weights_name):
    """The bundle's config.yaml: weights and output folder relative to the bundle."""
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.train.init_checkpoint = weights_name
    cfg.train.output_dir = "."
    return lazy_config_text(cfg)


def _target_name(target):
    if isinstance(target, str):
        return target
    return f"{target.__module__}.{target.__qualname__}"


def _test_augmentations(cfg):
    try:
        return cfg.dataloader.test.mapper.augmentations
    except Exception:  # omegaconf raises several kinds for a missing path
        return []


def lazy_input_contract(cfg):
    """The input contract (see :func:`d2persist.export.input_contract`) of a LazyConfig."""
    model = cfg.model
    contract = {
        "format": str(model.get("input_format", "BGR")),
        "pixel_mean": [float(x) for x in model.get("pixel_mean", [])],
        "pixel_std": [float(x) for x in model.get("pixel_std", [])],
        "meta_architecture": _target_name(model._target_).rsplit(".", 1)[-1],
        "outputs": [],
    }
    for aug in _test_augmentations(cfg):
        if _target_name(aug._target_).endswith("ResizeShortestEdge"):
            size = aug.short_edge_length
            contract["min_size_test"] = int(size if isinstance(size, int) else size[0])
            contract["max_size_test"] = int(aug.get("max_size", 0))
    roi = model.get("roi_heads") or {}
    if "proposal_generator" in model or "head" in model:
        contract["outputs"].append("boxes")
    if roi.get("mask_head") is not None:
        contract["outputs"].append("masks")
    if roi.get("keypoint_head") is not None:
        contract["outputs"].append("keypoints")
    return contract


def lazy_train_dataset_names(cfg):
    """Names of the training datasets of a LazyConfig (``dataloader.train.dataset.names``)."""
    try:
        names = cfg.dataloader.train.dataset.names
    except Exception:  # omegaconf raises several kinds for a missing path
        return []
    return [names] if isinstance(names, str) else list(names)


def _check_targets(node, allowed, where="model"):
    """Refuse any ``_target_`` outside ``allowed`` module prefixes, before anything is imported."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None:
            name = _target_name(target)
            if not any(name == p or name.startswith(p + ".") for p in allowed):
                raise UnsafeArtifactError(
                    f"Refusing to instantiate {name!r} (at {where}): the config may only call "
                    f"into {', '.join(allowed)}."
                )
        for k, v in node.items():
            _check_targets(v, allowed, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_targets(v, allowed, f"{where}[{i}]")


def build_lazy_model(config, opts=None, allowed_targets=None):
    """
    Rebuild the model and test-time augmentations of a safe-loaded LazyConfig dict.

    Args:
        config (dict): the YAML content (from a safe loader).
        opts (list[str]): ``key=value`` overrides.
        allowed_targets (list[str]): extra module prefixes ``_target_`` may name.

    Returns:
        tuple: (model, list of augmentations, input format)
    """
    from detectron2.config import LazyConfig, instantiate
    from omegaconf import OmegaConf

    allowed = tuple(DEFAULT_ALLOWED_TARGETS) + tuple(allowed_targets or ())
    cfg = OmegaConf.create(config, flags={"allow_objects": True})
    if opts:
        LazyConfig.apply_overrides(cfg, list(opts))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    augs_cfg = OmegaConf.to_container(OmegaConf.create({"a": _test_augmentations(cfg)}),
                                      resolve=True)["a"]
    _check_targets(model_cfg, allowed)
    _check_targets(augs_cfg, allowed, "dataloader.test.mapper.augmentations")
    try:
        model = instantiate(OmegaConf.create(model_cfg))
        augs = [instantiate(OmegaConf.create(a)) for a in augs_cfg]
    except Exception as e:  # instantiate wraps whatever the callables raise
        raise ArtifactError(f"The LazyConfig's model cannot be built: {e}") from None
    return model, augs, str(cfg.model.get("input_format", "BGR"))


def train_lazy(cfg, resume=False):
    """
    Train a LazyConfig like detectron2's ``tools/lazyconfig_train_net.py``, with PersistHook
    in place of PeriodicCheckpointer.
    """
    from detectron2.config import instantiate
    from detectron2.engine import AMPTrainer, SimpleTrainer, default_writers, hooks
    from detectron2.evaluation import inference_on_dataset, print_csv_format
    from detectron2.utils import comm

    from .checkpoint import PersistCheckpointer
    from .hook import PersistHook, check_output_dir
    from .trainer import create_ddp_model

    persist = PersistHook(cfg)
    persist.run.check()  # fails before any work; its before_train does not check again
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.get("ddp", {}))
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optim)
    checkpointer = PersistCheckpointer(model, cfg.train.output_dir, trainer=trainer)

    def do_test():
        if "evaluator" not in cfg.dataloader:
            return {}
        ret = inference_on_dataset(
            model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
        )
        print_csv_format(ret)
        return ret

    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            persist,
            hooks.EvalHook(cfg.train.eval_period, do_test),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if comm.is_main_process()
            else None,
        ]
    )
    path = checkpointer.get_checkpoint_file() if resume else ""
    if path:
        checkpointer.load(path)
        start_iter = trainer.iter + 1
    else:
        check_output_dir(cfg.train.output_dir, 0)
        checkpointer.load(cfg.train.init_checkpoint, checkpointables=[])
        start_iter = 0
    trainer.train(start_iter, cfg.train.max_iter)
    return trainer
