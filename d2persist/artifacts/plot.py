"""
The picture of a run (``d2persist plot``, and the ``training.png`` PersistHook keeps in every run
folder): losses, learning rate and every evaluation metric over iterations, checkpoints and the
best evaluation marked. Matplotlib's object API with the Agg canvas: no pyplot state, so it is
safe off the main thread.
"""

import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..files.atomic import atomic_path
from ..layout import TRAINING_PLOT, checkpoint_iteration
from .view import EVAL_TASKS, RunView

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_run", "BackgroundPlot"]

logger = logging.getLogger(__name__)


def _series(rows, key):
    pts = [(int(r["iteration"]), float(r[key])) for r in rows
           if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(view: RunView, path: Optional[str] = None) -> "Figure":
    """
    Draw the run of ``view`` and, with ``path``, write it as a PNG (atomically).

    The losses are plotted as detectron2's ``metrics.json`` holds them: ``EventStorage``'s
    median over the last 20 iterations at each logged iteration (the smoothing its writers use).

    Returns:
        matplotlib.figure.Figure: three axes: losses (``total_loss`` and each ``loss_*``;
        dashed, ``validation/total_loss`` at each evaluation with ``PERSIST.VAL_LOSS``),
        learning rate, evaluation metrics (every one ``evaluations.json`` recorded); dashed
        lines at the checkpoints' iterations, a star on the best evaluation (``best.json``), a
        red line where early stopping stopped the run.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = view.metrics_rows()
    keys = sorted({k for r in rows for k in r})
    losses = [k for k in keys if k == "total_loss" or k.startswith("loss_")]
    # every evaluation (evaluations.json), else those metrics.json kept
    evals = [{"iteration": it, **m} for it, m in sorted(view.evaluations().items())]
    metrics = sorted({k for r in evals for k in r
                      if "/" in k and k.split("/", 1)[0] in EVAL_TASKS})
    # the validation loss (PERSIST.VAL_LOSS) goes with the losses
    validation = [k for k in metrics if k == "validation/total_loss"]
    metrics = [k for k in metrics if not k.startswith("validation/")]
    fig = Figure(figsize=(9, 9), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_lr, ax_eval = fig.subplots(3, 1, sharex=True)
    for k in losses:
        ax_loss.plot(*_series(rows, k), label=k, linewidth=2 if k == "total_loss" else 1)
    for k in validation:
        ax_loss.plot(*_series(evals, k), marker="o", markersize=3, linestyle="--", label=k)
    ax_loss.set_ylabel("loss (median of 20 iterations)")
    ax_lr.plot(*_series(rows, "lr"), label="lr", color="tab:gray")
    ax_lr.set_ylabel("learning rate")
    for k in metrics:
        ax_eval.plot(*_series(evals, k), marker="o", markersize=3, label=k)
    ax_eval.set_ylabel("evaluation")
    ax_eval.set_xlabel("iteration")
    best = view.best_record() or {}
    if isinstance(best.get("iteration"), int) and isinstance(best.get("value"), (int, float)):
        ax_eval.plot([best["iteration"]], [best["value"]], marker="*", markersize=14,
                     color="gold", markeredgecolor="black", linestyle="none",
                     label=f"best {best.get('metric')}")
    for e in view.checkpoints() if view.kind == "run" else []:
        if checkpoint_iteration(e.name) is not None:
            for ax in (ax_loss, ax_lr, ax_eval):
                ax.axvline(e.iteration, color="black", alpha=0.25, linestyle="--",
                           linewidth=0.8, gid="checkpoint")
    early = view.early_stop() or {}
    if isinstance(early.get("stopped_after"), int):
        for ax in (ax_loss, ax_lr, ax_eval):
            ax.axvline(early["stopped_after"], color="tab:red", linewidth=1.2, gid="early-stop",
                       label="early stop" if ax is ax_eval else None)
    for ax in (ax_loss, ax_lr, ax_eval):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best", ncol=2)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{os.path.basename(view.path.rstrip('/')) or view.path}: training "
                 "(dashed: checkpoints)")
    fig.tight_layout()
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    return fig


class BackgroundPlot:
    """
    Keeps ``training.png`` of a run folder current from a background thread (matplotlib's
    object API, no pyplot): one drawing at a time; a request that comes while one runs is left
    to the next request or to the final picture. A picture never stops training: a failed
    drawing is a warning.

    The last picture (:meth:`finish`) is drawn after the export, never beside it: the export's
    evaluation may fork worker processes (panopticapi's PQ, data loaders), and a fork while this
    thread holds a lock (the import lock, logging's) leaves the child waiting for it forever.

    Args:
        output_dir (str): the run folder.
        on_drawn (callable): called with the file's name after each finished drawing (the
            mirror's upload), on the thread that asks for the next one or waits.
    """

    def __init__(self, output_dir: str,
                 on_drawn: Optional[Callable[[str], Any]] = None) -> None:
        self.output_dir = output_dir
        self.on_drawn = on_drawn
        self._thread: Optional[threading.Thread] = None

    def _start(self) -> None:
        """Start a drawing, once the one in progress (if any) has ended and been announced."""
        if self._thread is not None:
            self._thread.join()
            if self.on_drawn is not None:
                self.on_drawn(TRAINING_PLOT)
        self._thread = threading.Thread(target=self._draw, name="d2persist-plot", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Redraw now (after an evaluation), unless a drawing is in progress."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._start()

    def _draw(self):
        try:
            plot_run(RunView(self.output_dir, "run"), os.path.join(self.output_dir, TRAINING_PLOT))
        except Exception as e:  # a picture never stops training
            logger.warning("Could not draw %s: %s: %s", TRAINING_PLOT, type(e).__name__, e)

    def finish(self) -> None:
        """The picture of the whole run: after a drawing in progress, draw once more, wait."""
        self._start()
        assert self._thread is not None  # _start() started it
        self._thread.join()
        self._thread = None
        if self.on_drawn is not None:
            self.on_drawn(TRAINING_PLOT)
