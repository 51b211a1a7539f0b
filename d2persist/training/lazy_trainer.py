"""
LazyConfig runs: detectron2's ``tools/lazyconfig_train_net.py`` loop (SimpleTrainer/AMPTrainer)
with :class:`PersistHook` in place of ``PeriodicCheckpointer``.
"""

import logging

from detectron2.config import instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, TrainerBase, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import DictConfig

from ..errors import ConfigError, EarlyStopped
from .checkpointer import PersistCheckpointer
from .hook import PersistHook
from .resume import check_resume_point, resume_or_load
from .trainer import create_ddp_model

__all__ = ["train_lazy"]

logger = logging.getLogger(__name__)


def train_lazy(cfg: DictConfig, resume: bool = False) -> TrainerBase:
    """
    Train a LazyConfig like detectron2's ``tools/lazyconfig_train_net.py``, with PersistHook
    in place of PeriodicCheckpointer, resuming through
    :func:`d2persist.training.resume.resume_or_load`.

    Args:
        cfg: the LazyConfig (``train.persist`` holds d2persist's options, optional).
        resume (bool): continue the run in ``train.output_dir``.

    Returns:
        the trainer, once training has finished.
    """
    persist = PersistHook(cfg)
    persist.run.check()  # fails before any work (before_train reuses what it checked)
    try:  # the schedule too, before the model and the data are built
        instantiate(cfg.lr_multiplier)
    except (ValueError, AssertionError) as e:  # fvcore's, e.g. a milestone past max_iter
        raise ConfigError(f"The learning-rate schedule (lr_multiplier) does not fit "
                          f"train.max_iter {cfg.train.max_iter}: {e}.") from None
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
            hooks.EvalHook(cfg.train.eval_period, do_test),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if comm.is_main_process()
            else None,
            persist,  # last: see PersistHook
        ]
    )
    resumed = resume_or_load(checkpointer, cfg.train.init_checkpoint, resume=resume,
                             mirror=persist.options["MIRROR"])
    start = trainer.iter + 1 if resumed else 0
    check_resume_point(persist.run, start, cfg.train.max_iter)  # (before EvalHook's work)
    try:
        trainer.train(start, cfg.train.max_iter)
    except EarlyStopped:  # a completed run (PERSIST.EARLY_STOP_PATIENCE)
        pass
    return trainer
