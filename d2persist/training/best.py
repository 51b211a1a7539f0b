"""
Best-metric bookkeeping: which evaluation scored best so far, by the metric the user names.

The metric is a key under which ``EvalHook`` puts the flattened evaluation results into the
event storage (``"bbox/AP"``, ``"segm/AP50"``, ...).
"""

import logging
import math
import time
from typing import Collection, Dict, Optional, Tuple

from ..errors import ConfigError

__all__ = ["BEST_MODES", "BestMetric", "evaluation_value"]

logger = logging.getLogger(__name__)

#: Whether a larger ("max") or a smaller ("min") value is better.
BEST_MODES = ("max", "min")


def evaluation_value(latest: Dict[str, Tuple[float, int]], metric: str, iteration: int,
                     training_keys: Collection[str] = ()) -> Optional[float]:
    """
    The value of ``metric`` an evaluation just stored under ``iteration``.

    Args:
        latest (dict): ``EventStorage.latest()``: name -> (value, iteration).
        training_keys (set[str]): names training itself stores (left out of the error).

    Returns:
        float or None: None when the evaluation produced results but none of the metric's task
        (``"segm"`` of ``"segm/AP"``): COCOEvaluator reports no ``segm`` while the model detects
        nothing yet. The caller skips this evaluation (a warning says so).

    Raises:
        ConfigError: the evaluation produced the metric's task but not ``metric``; the sentence
            lists what it did produce.
    """
    entry = latest.get(metric)
    if entry is not None and int(entry[1]) == iteration:
        return float(entry[0])
    produced = sorted(k for k, (_, it) in latest.items() if it == iteration
                      and k not in training_keys)
    task = metric.split("/", 1)[0] + "/" if "/" in metric else None
    results = [k for k in produced if "/" in k]
    if task and results and not any(k.startswith(task) for k in results):
        logger.warning(
            "The evaluation after iteration %d produced no %s results (a model that detects "
            "nothing yet gives none), so PERSIST.BEST_METRIC %r is not compared this time; it "
            "produced: %s.", iteration, task[:-1], metric, ", ".join(results))
        return None
    raise ConfigError(
        f"PERSIST.BEST_METRIC {metric!r} is not a result of the evaluation after iteration "
        f"{iteration}, which produced: {', '.join(produced) or 'nothing'}."
    )


class BestMetric:
    """The best value of a metric so far, and the iteration that scored it."""

    def __init__(self, metric: str, mode: str = "max"):
        if mode not in BEST_MODES:
            raise ConfigError(f"PERSIST.BEST_MODE must be 'max' or 'min', not {mode!r}.")
        self.metric, self.mode = metric, mode
        self.value: Optional[float] = None
        self.iteration: Optional[int] = None

    def improves(self, value: float) -> bool:
        """Whether ``value`` is strictly better than the best so far (NaN never is)."""
        if math.isnan(value):
            return False
        if self.value is None:
            return True
        return value > self.value if self.mode == "max" else value < self.value

    def update(self, value: float, iteration: int) -> None:
        self.value, self.iteration = float(value), int(iteration)

    def record(self) -> dict:
        """What ``best.json`` holds."""
        return {"metric": self.metric, "mode": self.mode, "value": self.value,
                "iteration": self.iteration, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def state_dict(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "value": self.value,
                "iteration": self.iteration}

    def adopt(self, record: Optional[dict]) -> None:
        """
        On resume, take the best from the run's ``best.json`` (``record``, as
        :meth:`~d2persist.artifacts.view.RunView.best_record` reads it; None without one) if it
        is better than the checkpoint's: the evaluation that ends training comes after the last
        checkpoint was written.
        """
        if record is None:
            return
        try:
            value, iteration = float(record["value"]), int(record["iteration"])
            same = (record["metric"], record["mode"]) == (self.metric, self.mode)
        except (TypeError, ValueError, KeyError):
            logger.warning("best.json is not a best-metric record: ignored.")
            return
        if same and self.improves(value):
            self.update(value, iteration)

    def load_state_dict(self, state: dict) -> None:
        """Restore the best so far, unless it was kept for another metric or mode."""
        if state and state.get("metric") == self.metric and state.get("mode") == self.mode:
            self.value, self.iteration = state.get("value"), state.get("iteration")
