"""PersistTrainer: a DefaultTrainer wired for d2persist (used by ``tools/train_net.py``)."""

import logging
import os
import weakref

from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, hooks
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import PersistCheckpointer
from .errors import ArtifactError
from .hook import PersistHook, check_output_dir
from .resume import build_resumable_train_loader
from .runconfig import RunConfig

__all__ = ["PersistTrainer", "create_ddp_model"]

logger = logging.getLogger(__name__)


def create_ddp_model(model, **kwargs):
    """
    Like :func:`detectron2.engine.create_ddp_model`, but also for a model on the CPU (gloo), for
    which ``DistributedDataParallel`` rejects ``device_ids``.
    """
    if comm.get_world_size() == 1:
        return model
    if "device_ids" not in kwargs and next(model.parameters()).device.type == "cuda":
        kwargs["device_ids"] = [comm.get_local_rank()]
    return DistributedDataParallel(model, **kwargs)


class PersistTrainer(DefaultTrainer):
    """
    A :class:`DefaultTrainer` whose checkpointing is done by :class:`PersistHook`.

    Differences from its parent, each needed by a d2persist guarantee:

    - :class:`PersistHook` replaces ``PeriodicCheckpointer`` (atomic, hashed, retained
      checkpoints; config.yaml; export);
    - the training loader is a :class:`d2persist.resume.ResumableTrainLoader`, so a resumed run
      sees the batches the uninterrupted one would have;
    - ``resume_or_load`` verifies checkpoints and falls back to the newest good one, and refuses
      to start a new run over an earlier run's checkpoints;
    - several processes work on a CPU-only machine (DDP without ``device_ids``).
    """

    def __init__(self, cfg):
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

    def resume_or_load(self, resume=True):
        """
        Resume from the newest checkpoint that verifies, or start a new run from
        ``MODEL.WEIGHTS``. Checks first, so a bad setup fails before any work: the config must
        load back from YAML, and a new run must not overwrite an earlier run's checkpoints.
        """
        hook = next((h for h in self._hooks if isinstance(h, PersistHook)), None)
        (hook.run if hook is not None else RunConfig(self.cfg)).check()  # before_train reuses it
        # the main process verifies; every process loads the file it chose
        path = self.checkpointer.get_checkpoint_file() if resume and comm.is_main_process() else ""
        if comm.get_world_size() > 1:
            path = comm.all_gather(path)[0]
        if resume and not path:
            if self.checkpointer.get_all_checkpoint_files() and comm.is_main_process():
                raise ArtifactError(f"No checkpoint in {self.cfg.OUTPUT_DIR} verifies.")
            logger.info("No checkpoint to resume from in %s: starting a new run.",
                        self.cfg.OUTPUT_DIR)
        if path:
            self.checkpointer.load(path)
            self.start_iter = self.iter + 1
        else:
            check_output_dir(self.cfg.OUTPUT_DIR, 0)
            self.checkpointer.load(self.cfg.MODEL.WEIGHTS, checkpointables=[])
            self.start_iter = 0

    def build_hooks(self):
        """DefaultTrainer's hooks, with :class:`PersistHook` where ``PeriodicCheckpointer`` was."""
        ret = [h for h in super().build_hooks() if not isinstance(h, hooks.PeriodicCheckpointer)]
        at = next(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook))
        ret.insert(at, PersistHook(self.cfg))
        return ret

    @classmethod
    def build_train_loader(cls, cfg):
        return build_resumable_train_loader(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder)
