"""PersistTrainer: a DefaultTrainer wired for d2persist (used by ``tools/train_net.py``)."""

import logging
import weakref
from typing import Any, List, Optional

import torch
from detectron2.config import CfgNode
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, hooks
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from ..errors import D2PersistError, EarlyStopped
from ..runconfig import run_config
from .checkpointer import PersistCheckpointer
from .hook import PersistHook
from .resume import check_resume_point, resume_or_load
from .state import ResumableTrainLoader, build_resumable_train_loader

__all__ = ["PersistTrainer", "create_ddp_model"]

logger = logging.getLogger(__name__)


def create_ddp_model(model: torch.nn.Module, *, fp16_compression: bool = False,
                     **kwargs: Any) -> torch.nn.Module:
    """
    Like :func:`detectron2.engine.create_ddp_model` (same arguments), but also for a model on
    the CPU (gloo), for which ``DistributedDataParallel`` rejects ``device_ids``.
    """
    if comm.get_world_size() == 1:
        return model
    if "device_ids" not in kwargs and next(model.parameters()).device.type == "cuda":
        kwargs["device_ids"] = [comm.get_local_rank()]
    ddp = DistributedDataParallel(model, **kwargs)
    if fp16_compression:
        from torch.distributed.algorithms.ddp_comm_hooks import default as comm_hooks

        ddp.register_comm_hook(state=None, hook=comm_hooks.fp16_compress_hook)
    return ddp


class PersistTrainer(DefaultTrainer):
    """
    A :class:`DefaultTrainer` whose checkpointing is done by :class:`PersistHook`.

    Differences from its parent, each needed by a d2persist guarantee:

    - :class:`PersistHook` replaces ``PeriodicCheckpointer`` (atomic, hashed, retained
      checkpoints; config.yaml; export);
    - the training loader is a :class:`d2persist.training.state.ResumableTrainLoader`, so a resumed
      run sees the batches the uninterrupted one would have;
    - ``resume_or_load`` verifies checkpoints and falls back to the newest good one, and refuses
      to start a new run over an earlier run's checkpoints;
    - several processes work on a CPU-only machine (DDP without ``device_ids``).

    Like ``DefaultTrainer``, it has no evaluator: subclass it and define ``build_evaluator``
    (``tools/train_net.py`` uses ``COCOEvaluator``).
    """

    def __init__(self, cfg: CfgNode) -> None:
        run_config(cfg).check_settings()  # before anything is built (MAX_ITER 0 fails there)
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = PersistCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())
        if not any(isinstance(h, PersistHook) for h in self._hooks):
            raise D2PersistError(  # (it would train with nothing saved, a lock never released)
                f"{type(self).__name__}.build_hooks returns no PersistHook: call "
                "super().build_hooks() in it, or add PersistHook(cfg) to what it returns.")

    def resume_or_load(self, resume: bool = True) -> None:
        """
        Resume from the newest checkpoint that verifies, or start a new run from
        ``MODEL.WEIGHTS`` (see :func:`d2persist.training.resume.resume_or_load`). Checks first, so a
        bad setup fails before any work: the config must load back from YAML, and a new run
        must not overwrite an earlier run's checkpoints.
        """
        run = next(h for h in self._hooks if isinstance(h, PersistHook)).run  # (see __init__)
        run.check()  # before_train reuses it
        resumed = resume_or_load(self.checkpointer, self.cfg.MODEL.WEIGHTS, resume=resume,
                                 mirror=run.options["MIRROR"])
        self.start_iter = self.iter + 1 if resumed else 0
        check_resume_point(run, self.start_iter, self.max_iter)  # (before EvalHook's work)

    def train(self) -> Optional[dict]:
        """
        Train, as ``DefaultTrainer.train``; a run that early stopping ended
        (``PERSIST.EARLY_STOP_PATIENCE``) is a completed run and ends the same way.

        Returns:
            as ``DefaultTrainer.train``: with ``TEST.EXPECTED_RESULTS``, the last evaluation's
            results (checked against them), else None.
        """
        try:
            TrainerBase.train(self, self.start_iter, self.max_iter)
        except EarlyStopped:
            pass
        if len(self.cfg.TEST.EXPECTED_RESULTS) and comm.is_main_process():
            assert hasattr(self, "_last_eval_results"), \
                "No evaluation results obtained during training!"
            verify_results(self.cfg, self._last_eval_results)
            return self._last_eval_results
        return None

    def build_hooks(self) -> List[hooks.HookBase]:
        """DefaultTrainer's hooks without ``PeriodicCheckpointer``, and :class:`PersistHook`."""
        ret = [h for h in super().build_hooks() if not isinstance(h, hooks.PeriodicCheckpointer)]
        return ret + [PersistHook(self.cfg)]  # it runs last wherever it is put: see its docs

    @classmethod
    def build_train_loader(cls, cfg: CfgNode) -> ResumableTrainLoader:
        """A :class:`d2persist.training.state.ResumableTrainLoader`, for exact resume."""
        return build_resumable_train_loader(cfg)
