"""
``training``: a run that persists itself. PersistHook (it decides *when*), the trainers (yacs and
LazyConfig), the checkpointer, the one resume decision, best-model bookkeeping, EMA weights, the
validation loss, and the RNG and data position a bitwise resume needs.
"""

from .best import BestMetric
from .checkpointer import PersistCheckpointer
from .ema import ModelEMA
from .hook import PersistHook
from .lazy_trainer import train_lazy
from .resume import choose_checkpoint, resume_or_load
from .state import ResumableTrainLoader, build_resumable_train_loader
from .trainer import PersistTrainer
from .validation import validation_loss

__all__ = [
    "BestMetric",
    "PersistCheckpointer",
    "PersistHook",
    "train_lazy",
    "choose_checkpoint",
    "resume_or_load",
    "ResumableTrainLoader",
    "build_resumable_train_loader",
    "PersistTrainer",
    "ModelEMA",
    "validation_loss",
]
