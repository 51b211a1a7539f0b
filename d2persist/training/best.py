"""
Best-metric bookkeeping: which evaluation scored best so far, by the metric the user names;
when to stop early by it; and the record of every evaluation (``evaluations.json``).

The metric is a key under which ``EvalHook`` puts the flattened evaluation results into the
event storage (``"bbox/AP"``, ``"segm/AP50"``, ...).
"""

import logging
import math
import time
from typing import Any, Collection, Dict, Iterable, List, Optional, Tuple

from ..errors import ConfigError

__all__ = ["BEST_MODES", "BestMetric", "EarlyStopping", "EvaluationLog", "evaluation_value"]

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
    per_dataset = [k for k in produced if "/" in metric and k.endswith("/" + metric)]
    if per_dataset:  # several test datasets: DefaultTrainer.test nests each one's results
        raise ConfigError(
            f"PERSIST.BEST_METRIC {metric!r} is reported per test dataset by the evaluation "
            f"after iteration {iteration} ({', '.join(per_dataset)}): name one of those.")
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


def _number(value: Any) -> Optional[float]:
    """A finite or NaN float of ``value``; None when it is no number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class EarlyStopping:
    """
    Stops training after ``patience`` evaluations in a row that did not improve the metric by
    more than ``min_delta`` over the best so far (NaN never improves; an evaluation without the
    metric, see :func:`evaluation_value`, does not count).

    Its state is the metric's history, ``(iteration, value)`` of each evaluation; the count is
    computed from it. So a resume continues it exactly: the checkpoint carries the history up to
    its iteration, and :meth:`merge` adds what ``evaluations.json`` recorded after the
    checkpoint was written (the evaluation that ends a run comes after its last checkpoint).

    Args:
        metric (str): as ``PERSIST.BEST_METRIC``. mode (str): "max" or "min".
        patience (int): evaluations without improvement that stop training (> 0).
        min_delta (float): the improvement that counts, in the metric's units (>= 0).
    """

    def __init__(self, metric: str, mode: str, patience: int, min_delta: float = 0.0) -> None:
        if mode not in BEST_MODES:
            raise ConfigError(f"PERSIST.BEST_MODE must be 'max' or 'min', not {mode!r}.")
        self.metric, self.mode = metric, mode
        self.patience, self.min_delta = int(patience), float(min_delta)
        self.history: List[Tuple[int, float]] = []

    def add(self, iteration: int, value: float) -> None:
        """The evaluation of the weights after ``iteration`` (a later one of them replaces it)."""
        self.history = sorted([h for h in self.history if h[0] != iteration]
                              + [(int(iteration), float(value))])

    def _improves(self, value: float, best: Optional[float]) -> bool:
        if math.isnan(value):
            return False
        if best is None:
            return True
        if self.mode == "max":
            return value > best + self.min_delta
        return value < best - self.min_delta

    def status(self) -> dict:
        """``best``, ``best_iteration`` and ``without_improvement`` (evaluations since it)."""
        best: Optional[float] = None
        best_it: Optional[int] = None
        since = 0
        for it, value in self.history:
            if self._improves(value, best):
                best, best_it, since = value, it, 0
            else:
                since += 1
        return {"best": best, "best_iteration": best_it, "without_improvement": since}

    def should_stop(self) -> bool:
        return self.patience > 0 and self.status()["without_improvement"] >= self.patience

    def merge(self, records: Iterable[dict], before: int) -> None:
        """
        Add the metric of ``evaluations.json``'s ``records`` of iterations below ``before``
        that the history lacks (evaluated after the checkpoint it came from was written).
        """
        known = {it for it, _ in self.history}
        for rec in records:
            it, metrics = rec.get("iteration"), rec.get("metrics") or {}
            if self.metric not in metrics:
                continue
            # NaN is written as null, and counts as an evaluation without improvement
            value = float("nan") if metrics[self.metric] is None else _number(
                metrics[self.metric])
            if isinstance(it, int) and it < before and it not in known and value is not None:
                self.add(it, value)

    def record(self, stopped_after: Optional[int] = None) -> dict:
        """What ``evaluations.json`` says of it (``stopped_after``: the last iteration trained)."""
        return {"metric": self.metric, "mode": self.mode, "patience": self.patience,
                "min_delta": self.min_delta, **self.status(), "stopped_after": stopped_after}

    def state_dict(self) -> dict:
        return {"metric": self.metric, "mode": self.mode,
                "history": [[it, value] for it, value in self.history]}

    def load_state_dict(self, state: dict) -> None:
        """Restore the history, unless it was kept for another metric or mode."""
        if state and state.get("metric") == self.metric and state.get("mode") == self.mode:
            self.history = [(int(it), float(v)) for it, v in state.get("history") or []]


class EvaluationLog:
    """
    Every evaluation of a run as it happened, for ``evaluations.json``: detectron2's
    ``JSONWriter`` writes only the latest value of each key at its period, so evaluations that
    fall between two of its writes never reach ``metrics.json``. Each record is
    ``{"iteration": the iteration of the weights evaluated, "metrics": {name: value}}`` (NaN
    as null).
    """

    def __init__(self) -> None:
        self.records: List[dict] = []

    def start(self, records: Iterable[dict], before: int) -> None:
        """
        Continue the records of a resumed run: those of iterations below ``before``, from the
        checkpoint's (already in :attr:`records`) and ``evaluations.json``'s ``records`` (which
        also holds the evaluation after the checkpoint was written).
        """
        merged = {r["iteration"]: r for r in self.records if isinstance(r.get("iteration"), int)}
        merged.update((r["iteration"], r) for r in records if isinstance(r.get("iteration"), int))
        self.records = [merged[it] for it in sorted(merged) if it < before]

    def add(self, iteration: int, metrics: Dict[str, Any]) -> None:
        """Record an evaluation (a later one of the same weights replaces it)."""
        clean = {}
        for k, v in sorted(metrics.items()):
            v = _number(v)
            clean[k] = None if v is None or not math.isfinite(v) else v
        self.records = [r for r in self.records if r["iteration"] != iteration]
        self.records.append({"iteration": int(iteration), "metrics": clean})
        self.records.sort(key=lambda r: r["iteration"])

    def to_json(self, early_stop: Optional[dict] = None) -> dict:
        out: Dict[str, Any] = {"evaluations": [dict(r) for r in self.records]}
        if early_stop is not None:
            out["early_stop"] = early_stop
        return out
