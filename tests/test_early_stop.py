"""
Early stopping (``PERSIST.EARLY_STOP_PATIENCE``) and the record of every evaluation
(``evaluations.json``), with real trainers, EvalHook and evaluation passes; the evaluator reports
a scripted metric (tests/scripts/scripted_metric_trainer.py) that improves once, after
iteration 3, and never again.
"""

import json
import logging
import shutil

import pytest
import torch
from helpers import (
    LAUNCH2,
    ONE_THREAD,
    TINY_OPTS,
    direct_validation_loss,
    run_tool,
    tiny_cfg,
    train,
)

from d2persist import EarlyStopped, PersistTrainer, open_view
from d2persist.artifacts.checkpoints import evaluated_weights
from tests.scripts.scripted_metric_trainer import SCRIPT_PATH, ScriptedEvaluator

#: evaluations after iterations 1 (AP 10), 3 (20), 5 (20), 7 (20), ...: patience 2 stops the
#: run after iteration 7; a checkpoint every 2 iterations
OPTS = ["DATASETS.TEST", "('shapes_val_10',)", "TEST.EVAL_PERIOD", 2, "SOLVER.CHECKPOINT_PERIOD",
        2, "PERSIST.BEST_METRIC", "bbox/AP", "PERSIST.EARLY_STOP_PATIENCE", 2]
STOP = 7


class Trainer(PersistTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return ScriptedEvaluator()


def _iteration(path):
    return torch.load(path, weights_only=True)["iteration"]


class _Said(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """
    A run of MAX_ITER 20 that early stopping ends after iteration 7 (PersistTrainer):
    ``(folder, what d2persist's training logged)``.
    """
    out = tmp_path_factory.mktemp("stopped")
    said, logger = _Said(), logging.getLogger("d2persist.training")
    logger.addHandler(said)
    try:
        trainer = train(tiny_cfg(out, *OPTS, "SOLVER.MAX_ITER", 20), trainer_cls=Trainer)
    finally:
        logger.removeHandler(said)
    assert trainer.iter == STOP  # train() returned: a completed run
    return out, said.lines


def test_early_stopping_completes_the_run_after_the_right_iteration(stopped_run):
    out, said = stopped_run
    said = [line for line in said if "Early stopping" in line]
    assert len(said) == 1 and said[0].startswith(
        f"Early stopping after iteration {STOP}: bbox/AP has not improved by more than 0.0 "
        "for 2 evaluations (best 20.0 after iteration 3")
    assert EarlyStopped(STOP).code == 0  # what ends a stock trainer's script: exit status 0
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert _iteration(out / "model_final.pth") == STOP
    assert not (out / "model_0000009.pth").exists()
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert manifest["iteration"] == STOP
    assert manifest["evaluation"]["failed"] == []  # the export evaluated itself
    best = json.loads((out / "best.json").read_text())
    assert (best["iteration"], best["value"]) == (3, 20.0)


def test_every_evaluation_is_recorded_and_ls_shows_where_it_stopped(stopped_run):
    """metrics.json (written every 20 iterations) lacks most of them; evaluations.json not."""
    stopped_run, _ = stopped_run
    view = open_view(str(stopped_run))
    records = view.evaluation_records()
    assert [(r["iteration"], r["metrics"]) for r in records] == [
        (1, {"bbox/AP": 10.0}), (3, {"bbox/AP": 20.0}), (5, {"bbox/AP": 20.0}),
        (7, {"bbox/AP": 20.0})]  # the evaluation's results only, not training's timers
    in_metrics_json = {r["iteration"] for r in view.metrics_rows() if "bbox/AP" in r}
    assert {1, 3, 5} - in_metrics_json  # what JSONWriter's period dropped
    by_name = {e.name: e for e in view.checkpoints()}
    for it in (1, 3, 5):
        assert by_name[f"model_{it:07d}.pth"].metrics["bbox/AP"] == records[it // 2]["metrics"][
            "bbox/AP"]
    assert "best" in by_name["model_0000003.pth"].markers
    early = view.early_stop()
    assert early["stopped_after"] == STOP and early["without_improvement"] == 2
    assert (early["best"], early["best_iteration"], early["patience"]) == (20.0, 3, 2)
    from d2persist.artifacts.plot import plot_run

    ax_eval = plot_run(view).axes[2]  # training.png draws every evaluation and the stop
    ap = next(ln for ln in ax_eval.get_lines() if ln.get_label() == "bbox/AP")
    assert list(ap.get_xdata()) == [1, 3, 5, 7]
    assert [ln.get_xdata()[0] for ln in ax_eval.get_lines() if ln.get_gid() == "early-stop"] \
        == [STOP]
    listed = run_tool("-m", "d2persist", "ls", stopped_run)
    assert listed.returncode == 0, listed.stderr
    assert f"stopped early after iteration {STOP}" in listed.stdout
    assert "bbox/AP 10.0" in listed.stdout  # model_0000001.pth's evaluation


def test_a_resume_in_the_patience_window_continues_the_count(tmp_path):
    """
    A run ending at MAX_ITER 6 (its final evaluation, after its last checkpoint, is the first
    without improvement) resumed to MAX_ITER 20 stops where the uninterrupted run did.
    """
    out = tmp_path / "run"
    train(tiny_cfg(out, *OPTS, "SOLVER.MAX_ITER", 6), trainer_cls=Trainer)
    assert open_view(str(out)).early_stop()["without_improvement"] == 1
    trainer = train(tiny_cfg(out, *OPTS, "SOLVER.MAX_ITER", 20), resume=True, trainer_cls=Trainer)
    assert trainer.iter == STOP and _iteration(out / "model_final.pth") == STOP
    assert [r["iteration"] for r in open_view(str(out)).evaluation_records()] == [1, 3, 5, 7]
    # resuming a stopped run trains nothing more; a larger patience goes on
    again = train(tiny_cfg(out, *OPTS, "SOLVER.MAX_ITER", 20), resume=True, trainer_cls=Trainer)
    assert again.iter == STOP + 1 and _iteration(out / "model_final.pth") == STOP
    more = train(tiny_cfg(out, *OPTS, "SOLVER.MAX_ITER", 20, "PERSIST.EARLY_STOP_PATIENCE", 3),
                 resume=True, trainer_cls=Trainer)
    assert more.iter == 9 and _iteration(out / "model_final.pth") == 9


class _Killed(BaseException):
    """A SIGKILL: nothing after it runs."""


def test_a_run_killed_before_it_named_its_first_best_names_it_on_resume(tmp_path, mocker):
    """
    Killed after its first checkpoint (it records a new best) was written, before it was named
    model_best.pth and tagged: with no tag, the resume takes that checkpoint, best already in
    its state. The best (the lowest AP: 10 after iteration 1, 20 after) never improves again,
    so only the resume can name it; the export of the best needs it.
    """
    from d2persist.artifacts.checkpoints import verify_checkpoint
    from d2persist.training.hook import PersistHook

    opts = ["DATASETS.TEST", "('shapes_val_10',)", "TEST.EVAL_PERIOD", 2,
            "SOLVER.CHECKPOINT_PERIOD", 2, "PERSIST.BEST_METRIC", "bbox/AP",
            "PERSIST.BEST_MODE", "min", "PERSIST.EXPORT_FROM", "best", "PERSIST.ASYNC", False,
            "PERSIST.EXPORT_EVAL", False, "SOLVER.MAX_ITER", 4]
    mocker.patch.object(PersistHook, "_link_best", side_effect=_Killed)
    with pytest.raises(_Killed):
        train(tiny_cfg(tmp_path, *opts), trainer_cls=Trainer)
    mocker.stopall()
    assert (tmp_path / "model_0000001.pth").is_file()
    assert not (tmp_path / "last_checkpoint").exists() and not (tmp_path / "best.json").exists()
    train(tiny_cfg(tmp_path, *opts), resume=True, trainer_cls=Trainer)
    best = json.loads((tmp_path / "best.json").read_text())
    assert (best["iteration"], best["value"]) == (1, 10.0)
    assert verify_checkpoint(str(tmp_path / "model_best.pth")) is None
    assert _iteration(tmp_path / "model_best.pth") == 1
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert (manifest["source"]["from"], manifest["iteration"]) == ("best", 1)
    # killed between model_best.pth and best.json: the record is written again too
    (tmp_path / "best.json").write_text(json.dumps(dict(best, iteration=3, value=20.0)))
    train(tiny_cfg(tmp_path, *opts), resume=True, trainer_cls=Trainer)
    assert json.loads((tmp_path / "best.json").read_text())["iteration"] == 1


def test_a_stock_trainer_gets_exit_status_0_and_so_do_two_processes_then_2_to_1(tmp_path):
    """
    Under launch() with 2 processes a stock DefaultTrainer stops on both after the same
    iteration with exit status 0; resumed by 1 process from the checkpoint in the middle of
    its patience window, it stops after the same iteration. With EMA weights and the
    validation loss: the loss of 2 processes is the mean over each image once, and the average
    continues across the 2 -> 1 resume.
    """
    out = tmp_path / "two"
    # FrozenBN: the processes' BatchNorm statistics would differ (DDP does not broadcast them),
    # and each process's evaluation and loss would use its own, as detectron2's evaluation does
    ema_loss = ["PERSIST.VAL_LOSS", True, "PERSIST.EMA_DECAY", 0.5, "PERSIST.EMA_WARMUP", 0,
                "MODEL.RESNETS.NORM", "FrozenBN"]
    opts = [*TINY_OPTS, *OPTS, "SOLVER.MAX_ITER", 20, "PERSIST.EXPORT_EVAL", False, *ema_loss]
    res = run_tool(SCRIPT_PATH, *LAUNCH2, *opts, "OUTPUT_DIR", out, env=ONE_THREAD, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _iteration(out / "model_final.pth") == STOP
    assert (out / "export" / "manifest.json").is_file()
    # both processes stopped after the same iteration (one that went on would wait for the
    # other in DDP's next gradient reduction until --dist-timeout failed the run)
    states = torch.load(out / "model_final.pth", weights_only=True)["trainer"]["hooks"][
        "PersistHook"]["resume"]
    assert len(states) == 2
    _assert_validation_loss(out, "model_0000001.pth", 1, ema_loss)

    one = tmp_path / "one"  # the run as it stood after iteration 5: one evaluation without gain
    shutil.copytree(out, one, ignore=shutil.ignore_patterns(
        "model_0000007.pth*", "model_final.pth*", "export", "*.lock"))
    (one / "last_checkpoint").write_text("model_0000005.pth")
    # the history travels in the checkpoint, not only in evaluations.json
    state = torch.load(one / "model_0000005.pth", weights_only=True)["trainer"]["hooks"][
        "PersistHook"]
    assert state["early_stop"]["history"] == [[1, 10.0], [3, 20.0], [5, 20.0]]
    (one / "evaluations.json").unlink()
    res = run_tool(SCRIPT_PATH, "--resume", *opts, "OUTPUT_DIR", one, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "The checkpoint was written by 2 processes, this run has 1" in res.stderr
    assert _iteration(one / "model_final.pth") == STOP
    assert [r["iteration"] for r in open_view(str(one)).evaluation_records()] == [1, 3, 5, 7]
    ema = torch.load(one / "model_final.pth", weights_only=True)["trainer"]["hooks"][
        "PersistHook"]["ema"]
    assert ema["updates"] == STOP + 1  # 6 in model_0000005.pth, then iterations 6 and 7
    _assert_validation_loss(one, "model_final.pth", STOP, ema_loss)


def _assert_validation_loss(out, checkpoint, iteration, opts):
    """The validation loss recorded after ``iteration`` is the one of ``checkpoint``'s EMA."""
    weights, ema = evaluated_weights(torch.load(out / checkpoint, weights_only=True))
    assert ema is not None
    expected = direct_validation_loss(tiny_cfg(out, *OPTS, *opts), weights)
    got = next(r["metrics"] for r in open_view(str(out)).evaluation_records()
               if r["iteration"] == iteration)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, rel=1e-6), k
