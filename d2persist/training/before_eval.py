"""
BeforeEvaluation: the part of PersistHook that must run before ``EvalHook`` in each iteration
(the EMA update, the averaged weights swapped in, the validation loss).
"""

import logging
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Tuple

from detectron2.engine.hooks import HookBase

from .ema import ModelEMA
from .validation import validation_batches, validation_loss

if TYPE_CHECKING:
    from ..runconfig import RunConfig

__all__ = ["BeforeEvaluation"]

logger = logging.getLogger(__name__)


class BeforeEvaluation(HookBase):
    """
    Placed by :class:`~d2persist.training.hook.PersistHook` right before ``EvalHook`` (or at
    the end, before PersistHook, in a loop without one); PersistHook owns its state and gives
    the model its own weights back after the evaluation (at the start of its ``after_step``
    and ``after_train``).

    - ``after_step``: with ``PERSIST.EMA_DECAY``, updates the average (every iteration, after
      the optimizer's step and the hooks before it); when EvalHook evaluates in this iteration:
      with ``PERSIST.EMA_EVAL``, swaps the average into the model, then with
      ``PERSIST.VAL_LOSS`` computes the validation loss of the weights to be evaluated and
      stores it in the event storage, as EvalHook stores its results.
    - ``after_train``: the same for EvalHook's final evaluation (when training completed).
    """

    def __init__(self, run: "RunConfig", ema: Optional[ModelEMA],
                 evaluated_after: Callable[[int], bool]) -> None:
        """
        Args:
            run: the run's config.
            ema: the average, or None (``PERSIST.EMA_DECAY`` 0).
            evaluated_after: whether EvalHook evaluates after iteration ``it``.
        """
        self.run = run
        self.ema = ema
        self.evaluated_after = evaluated_after
        self.val_loss = bool(run.options["VAL_LOSS"])
        self.ema_eval = ema is not None and bool(run.options["EMA_EVAL"])
        #: whether EvalHook evaluates when training completes (its ``eval_after_train``)
        self.eval_after_train = True
        self._batches: Optional[Iterable[Tuple[int, dict]]] = None

    def prepare(self) -> None:
        """Build what the validation loss reads (at ``before_train``: bad input fails first)."""
        if self.val_loss and self._batches is None:
            self._batches = validation_batches(self.run)

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.update()
        if self.evaluated_after(self.trainer.iter):
            self._prepare()

    def after_train(self) -> None:
        # EvalHook's condition for its final evaluation; not where training never started
        # (refused before PersistHook attached the average: a resume past MAX_ITER)
        if self.ema is not None and not self.ema.attached:
            return
        if self.eval_after_train and self.trainer.iter + 1 >= self.trainer.max_iter:
            self._prepare()

    def _prepare(self):
        if self.ema_eval:
            assert self.ema is not None
            self.ema.swap_in()
        if self.val_loss:
            self.prepare()
            assert self._batches is not None
            losses = validation_loss(self.trainer.model, self._batches)
            if losses:
                self.trainer.storage.put_scalars(**losses, smoothing_hint=False)
                logger.info("Validation loss of the weights after iteration %d%s: %s.",
                            self.trainer.storage.iter, " (EMA)" if self.ema_eval else "",
                            ", ".join(f"{k[len('validation/'):]} {v:.4f}"
                                      for k, v in losses.items()))
