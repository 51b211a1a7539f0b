"""
An exponential moving average of a model's weights (``PERSIST.EMA_DECAY``), exact across resumes.
"""

import contextlib
import logging
import math
from typing import Any, Dict, Iterator, List, Optional, Set

import torch

__all__ = ["ModelEMA", "unwrap_model"]

logger = logging.getLogger(__name__)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel`` (else ``model``)."""
    return getattr(model, "module", model) if isinstance(
        model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) else model


class ModelEMA:
    """
    An average of every floating-point tensor of a model's ``state_dict`` (weights and buffers;
    others, e.g. BatchNorm's counters, are copied), updated by :meth:`update` after each
    optimizer step with ``decay * (1 - exp(-updates / warmup))`` (Ultralytics' warm-up; the
    plain ``decay`` when ``warmup`` is 0).

    The average lives on the model's device, in the model's dtypes, and is updated with one
    ``torch._foreach_lerp_`` over all tensors; the same weights give the same average on every
    process. Its state (:meth:`state_dict`) is the average and the number of updates, so a
    resumed run continues it bitwise.
    """

    def __init__(self, decay: float, warmup: float = 0.0) -> None:
        """
        Args:
            decay (float): in [0, 1); the weight of the old average at each update.
            warmup (float): iterations over which the decay ramps up (0: none).
        """
        self.decay = float(decay)
        self.warmup = float(warmup)
        self.updates = 0
        self._model: Optional[torch.nn.Module] = None
        self._average: Dict[str, torch.Tensor] = {}
        self._param_average: List[torch.Tensor] = []
        self._param_live: List[torch.Tensor] = []
        self._buffers: Set[str] = set()
        self._by_state_dict: Set[str] = set()
        self._pending: Optional[Dict[str, Any]] = None  # loaded before a model was attached
        self._backup: Optional[Dict[str, torch.Tensor]] = None  # the weights while swapped
        self._swapped = False
        self.restored = False  # whether attach() continued a saved average

    # -- the model -----------------------------------------------------------------------------

    def _live(self) -> Dict[str, torch.Tensor]:
        assert self._model is not None
        return self._model.state_dict(keep_vars=False)

    @property
    def attached(self) -> bool:
        """Whether :meth:`attach` gave it its model."""
        return self._model is not None

    def attach(self, model: torch.nn.Module) -> None:
        """
        Follow ``model`` (a DDP model is unwrapped): the average starts as a copy of its state,
        or, when :meth:`load_state_dict` gave one, as the saved average.

        Raises:
            ValueError: the saved average does not fit the model (names or shapes).
        """
        self._model = unwrap_model(model)
        live = self._live()
        self._average = {k: v.detach().clone() for k, v in live.items()}
        # the parameters, once: they stay the model's for good (the optimizer holds them);
        # buffers are looked up at each update (fvcore's PreciseBN assigns new ones)
        params = [(k, p) for k, p in self._model.named_parameters() if k in live]
        self._param_average = [self._average[k] for k, p in params if p.is_floating_point()]
        self._param_live = [p for _, p in params if p.is_floating_point()]
        covered = {k for k, p in params if p.is_floating_point()}
        buffers = {k for k, _ in self._model.named_buffers() if k in live}
        self._by_state_dict = set(live) - covered - buffers  # neither: read from state_dict()
        self._buffers = buffers
        pending, self._pending = self._pending, None
        if pending is not None:
            self._load_average(pending)
            self.restored = True

    def _load_average(self, state):
        saved = state["model"]
        live = self._average
        wrong = sorted(set(saved) ^ set(live)) or sorted(
            k for k in live if tuple(saved[k].shape) != tuple(live[k].shape))
        if wrong:
            raise ValueError(f"The checkpoint's EMA weights do not fit this model ({len(wrong)} "
                             f"tensors differ, e.g. {wrong[0]}).")
        with torch.no_grad():
            for k, v in live.items():
                v.copy_(saved[k])
        self.updates = int(state["updates"])
        was = (state.get("decay"), state.get("warmup"))
        if was != (self.decay, self.warmup) and None not in was:
            logger.info("The EMA weights were averaged with decay %s, warm-up %s; they continue "
                        "with decay %s, warm-up %s.", *was, self.decay, self.warmup)

    # -- averaging -----------------------------------------------------------------------------

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        if self.warmup <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-(self.updates + 1) / self.warmup))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the model's current state (after an optimizer step)."""
        assert self._model is not None and not self._swapped, "update() of a swapped model"
        decay = self.current_decay()
        if self._param_live:  # one pass over all weights
            torch._foreach_lerp_(self._param_average, self._param_live, 1.0 - decay)
        rest = [(k, b) for k, b in self._model.named_buffers() if k in self._buffers]
        if self._by_state_dict:
            live = self._live()
            rest += [(k, live[k]) for k in self._by_state_dict]
        floats = [(k, v) for k, v in rest if v.is_floating_point()]
        if floats:
            torch._foreach_lerp_([self._average[k] for k, _ in floats], [v for _, v in floats],
                                 1.0 - decay)
        for k, v in rest:
            if not v.is_floating_point():
                self._average[k].copy_(v)
        self.updates += 1

    # -- evaluating the average ----------------------------------------------------------------

    @torch.no_grad()
    def swap_in(self) -> None:
        """Put the average into the model, keeping its own weights aside (no-op if done)."""
        if self._swapped:
            return
        live = self._live()
        self._backup = {k: v.detach().clone() for k, v in live.items()}
        for k, v in live.items():
            v.copy_(self._average[k])
        self._swapped = True

    @torch.no_grad()
    def swap_out(self) -> None:
        """Give the model its own weights back (no-op if they are there)."""
        if not self._swapped:
            return
        assert self._backup is not None
        for k, v in self._live().items():
            v.copy_(self._backup[k])
        self._swapped = False
        self._backup = None  # not kept between evaluations: a third copy of the weights

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the average inside the block; as before after it."""
        was = self._swapped
        self.swap_in()
        try:
            yield
        finally:
            if not was:
                self.swap_out()

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """``model`` (name -> the average), ``updates``, ``decay``, ``warmup``."""
        return {"model": dict(self._average), "updates": self.updates, "decay": self.decay,
                "warmup": self.warmup}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from a saved average (applied when a model is attached, if none is yet)."""
        if self._model is None:
            self._pending = state
        else:
            self._load_average(state)
