"""
The validation loss (``PERSIST.VAL_LOSS``) and EMA weights (``PERSIST.EMA_DECAY``), on real
trainers, evaluations and exports; their exact resume is tests/test_resume.py's kill harness.
"""

import json

import pytest
import torch
from helpers import (
    EVAL_OPTS,
    assert_bitwise_equal,
    direct_validation_loss,
    eval_trainer,
    run_tool,
    tiny_cfg,
    train,
)
from safetensors.torch import load_file

from d2persist import open_view
from d2persist.artifacts.checkpoints import evaluated_weights

#: a checkpoint and an evaluation every 2 iterations (after 1, 3, 5: the last is final's)
OPTS = [*EVAL_OPTS, "SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 2,
        "PERSIST.EMA_DECAY", 0.8, "PERSIST.EMA_WARMUP", 0]
#: the validation loss picks the best model, which is exported and evaluates itself
WITH_LOSS = ["PERSIST.VAL_LOSS", True, "PERSIST.BEST_METRIC", "validation/total_loss",
             "PERSIST.BEST_MODE", "min", "PERSIST.EXPORT_FROM", "best", "PERSIST.EXPORT_EVAL", True]


def _load(path):
    return torch.load(path, weights_only=True)


def _ema(path):
    return _load(path)["trainer"]["hooks"]["PersistHook"]["ema"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same training with and without the validation loss (both with EMA weights)."""
    root = tmp_path_factory.mktemp("ema")
    train(tiny_cfg(root / "loss", *OPTS, *WITH_LOSS), trainer_cls=eval_trainer())
    train(tiny_cfg(root / "plain", *OPTS), trainer_cls=eval_trainer())
    return root / "loss", root / "plain"


def test_validation_loss_is_the_models_loss_on_each_test_image_once(runs):
    loss, _ = runs
    records = {r["iteration"]: r["metrics"] for r in open_view(str(loss)).evaluation_records()}
    assert sorted(records) == [1, 3, 5]
    weights, ema = evaluated_weights(_load(loss / "model_0000003.pth"))
    assert ema == {"decay": 0.8, "warmup": 0.0, "updates": 4}  # evaluated: the average
    expected = direct_validation_loss(tiny_cfg(loss, *OPTS), weights)
    got = {k: v for k, v in records[3].items() if k.startswith("validation/")}
    assert set(got) == set(expected) and {"validation/total_loss", "validation/loss_mask"} <= set(
        got)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, rel=1e-6), k
    # in metrics.json, TensorBoard's events and the best's choice
    rows = [r for r in open_view(str(loss)).metrics_rows() if "validation/total_loss" in r]
    assert rows and all(r["iteration"] in (1, 3, 6) for r in rows)  # 6: after_train's
    best = json.loads((loss / "best.json").read_text())
    losses = {it: m["validation/total_loss"] for it, m in records.items()}
    assert best["metric"] == "validation/total_loss" and best["value"] == min(losses.values())
    assert best["iteration"] == min(losses, key=losses.get)
    from d2persist.artifacts.plot import plot_run

    ax_loss = plot_run(open_view(str(loss))).axes[0]  # with training's losses
    drawn = next(ln for ln in ax_loss.get_lines() if ln.get_label() == "validation/total_loss")
    assert list(drawn.get_xdata()) == [1, 3, 5]
    listed = run_tool("-m", "d2persist", "ls", loss)
    assert listed.returncode == 0, listed.stderr
    line = next(ln for ln in listed.stdout.splitlines() if "model_0000003.pth" in ln)
    assert f"validation/total_loss {records[3]['validation/total_loss']:.4g}" in line


def test_a_run_with_the_validation_loss_is_bitwise_the_run_without(runs):
    loss, plain = runs
    for name in ("model_0000001.pth", "model_0000003.pth", "model_final.pth"):
        a, b = _load(loss / name), _load(plain / name)
        assert_bitwise_equal(a["model"], b["model"])
        assert_bitwise_equal(_ema(loss / name)["model"], _ema(plain / name)["model"])
        (ra,), (rb,) = (x["trainer"]["hooks"]["PersistHook"]["resume"] for x in (a, b))
        assert torch.equal(ra["rng"]["torch"], rb["rng"]["torch"])  # the RNG training goes on with
        assert ra["rng"]["python"] == rb["rng"]["python"] and ra["data"] == rb["data"]
    rows = {}
    for run in runs:
        rows[run] = [(r["iteration"], r["total_loss"]) for r in open_view(str(run)).metrics_rows()
                     if "total_loss" in r]
    assert rows[loss] == rows[plain]


def test_the_export_holds_the_averaged_weights_and_scores_what_they_scored(runs):
    loss, plain = runs
    for run, checkpoint in ((loss, "model_best.pth"), (plain, "model_final.pth")):
        manifest = json.loads((run / "export" / "manifest.json").read_text())
        exported = load_file(str(run / "export" / "model.safetensors"))
        average = _ema(run / checkpoint)
        assert manifest["source"]["weights"] == "ema"
        assert manifest["source"]["ema"]["updates"] == average["updates"]
        assert_bitwise_equal(exported, average["model"])
        own = _load(run / checkpoint)["model"]
        assert any(not torch.equal(own[k], exported[k]) for k in own)  # not the model's own
    evaluation = json.loads((loss / "export" / "manifest.json").read_text())["evaluation"]
    assert evaluation["failed"] == [] and evaluation["reference_from"] == "training"
    assert evaluation["max_difference"]["pytorch"] == 0.0  # what the average scored in training


def test_a_prediction_from_a_checkpoint_uses_the_averaged_weights(runs, tmp_path):
    import shutil

    from detectron2.modeling import build_model

    from d2persist import load_predictor
    from d2persist.predict.rebuild import load_weights

    _, plain = runs
    model = build_model(tiny_cfg(plain, *OPTS))
    load_weights(model, str(plain / "model_final.pth"))
    assert_bitwise_equal(model.state_dict(), _ema(plain / "model_final.pth")["model"])
    # the predictor says so, from the export and from a run folder without one
    assert "iteration 5, EMA weights (decay 0.8)" in load_predictor(str(plain)).weights
    bare = tmp_path / "bare"
    shutil.copytree(plain, bare, ignore=shutil.ignore_patterns("export", "*.lock"))
    predictor = load_predictor(str(bare))
    assert predictor.weights == "checkpoint model_final.pth, iteration 5, EMA weights (decay 0.8)"
    assert_bitwise_equal(predictor.model.state_dict(), _ema(plain / "model_final.pth")["model"])
    # without EMA_EVAL the run evaluated its own weights, and so does a prediction
    final = _load(plain / "model_final.pth")
    final["trainer"]["hooks"]["PersistHook"]["ema"]["evaluated"] = False
    weights, ema = evaluated_weights(final)
    assert ema is None and weights is final["model"]
