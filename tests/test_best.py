"""The best model: model_best.pth and best.json, with a real EvalHook and COCOEvaluator."""

import json
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from helpers import (
    EVAL_OPTS,
    INFER_SINGLE,
    assert_bitwise_equal,
    eval_trainer,
    metric_recorder,
    run_tool,
    tiny_cfg,
    train,
)
from safetensors.torch import load_file

from d2persist import ConfigError
from d2persist.artifacts.checkpoints import verify_checkpoint

# every box is kept, so that AP differs from one evaluation to the next even this early
OPTS = [*EVAL_OPTS, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "PERSIST.MAX_TO_KEEP", 1]


def _run(folder, *opts, resume=False):
    cfg = tiny_cfg(folder, *OPTS, *opts)
    recorder = metric_recorder(cfg.PERSIST.BEST_METRIC)
    train(cfg, resume=resume, hooks=[recorder], trainer_cls=eval_trainer())
    return cfg, recorder.values


def _best_of(values, mode):
    pick = max if mode == "max" else min
    value = pick(values.values())
    return value, min(it for it, v in values.items() if v == value)  # the first one that scored


def test_best_checkpoint_holds_the_weights_that_scored_it(tmp_path):
    # evaluations after iterations 1, 3 (also a checkpoint), 5, 7 (also a checkpoint) and 9
    cfg, values = _run(tmp_path, "SOLVER.MAX_ITER", 10, "SOLVER.CHECKPOINT_PERIOD", 4,
                       "PERSIST.BEST_METRIC", "bbox/AP50", "PERSIST.EXPORT_FROM", "best")
    assert sorted(values) == [1, 3, 5, 7, 9]
    record = json.loads((tmp_path / "best.json").read_text())
    assert (record["value"], record["iteration"]) == _best_of(values, "max")
    assert (record["metric"], record["mode"]) == ("bbox/AP50", "max")

    best = tmp_path / "model_best.pth"
    assert verify_checkpoint(str(best)) is None  # hashed like every checkpoint
    assert torch.load(best, weights_only=True)["iteration"] == record["iteration"]
    assert "model_0000003.pth" not in os.listdir(tmp_path)  # retention never removes the best
    # a fresh evaluation of model_best.pth, loaded by stock detectron2, gives the recorded value
    trainer_cls = eval_trainer()
    model = trainer_cls.build_model(cfg)
    DetectionCheckpointer(model).load(str(best))
    fresh = trainer_cls.test(cfg, model)
    assert fresh["bbox"]["AP50"] == pytest.approx(record["value"], abs=1e-9)

    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["source"] == {"from": "best", "metric": "bbox/AP50", "mode": "max",
                                  "value": record["value"], "iteration": record["iteration"]}
    assert_bitwise_equal(load_file(str(tmp_path / "export" / "model.safetensors")),
                         torch.load(best, weights_only=True)["model"])
    from detectron2.data import DatasetCatalog

    image = DatasetCatalog.get("shapes_val")[0]["file_name"]
    res = run_tool(INFER_SINGLE, "--image", image, "--artifacts", tmp_path,
                   "--json", tmp_path / "p.json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (f"weights: the best weights by bbox/AP50 (max): {record['value']} at iteration "
            f"{record['iteration']}") in res.stdout


def test_best_survives_resume(tmp_path, mode="max"):  # "min" across a restore: tests/unit
    opts = ["PERSIST.BEST_METRIC", "bbox/AP", "PERSIST.BEST_MODE", mode,
            "SOLVER.CHECKPOINT_PERIOD", 2]
    _, first = _run(tmp_path, *opts, "SOLVER.MAX_ITER", 4)
    _, second = _run(tmp_path, *opts, "SOLVER.MAX_ITER", 8, resume=True)
    assert sorted(first) == [1, 3] and sorted(second) == [5, 7]
    record = json.loads((tmp_path / "best.json").read_text())
    assert (record["value"], record["iteration"]) == _best_of({**first, **second}, mode)
    assert torch.load(tmp_path / "model_best.pth", weights_only=True)["iteration"] == record[
        "iteration"]


def test_metric_the_evaluation_does_not_produce_fails_listing_what_it_did(tmp_path):
    with pytest.raises(ConfigError, match=r"'bbox/APX' .* produced: .*bbox/AP50") as e:
        _run(tmp_path, "PERSIST.BEST_METRIC", "bbox/APX", "SOLVER.MAX_ITER", 4,
             "SOLVER.CHECKPOINT_PERIOD", 2)
    assert "\n" not in str(e.value) and "total_loss" not in str(e.value)
    # the checkpoint of the iteration evaluated is written first: the fixed name resumes there
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert verify_checkpoint(str(tmp_path / "model_0000001.pth")) is None


def test_best_metric_without_evaluation_fails_before_training(tmp_path):
    cfg = tiny_cfg(tmp_path, "PERSIST.BEST_METRIC", "bbox/AP")  # DATASETS.TEST is empty
    with pytest.raises(ConfigError, match="needs an evaluation"):
        train(cfg)
    assert not os.path.exists(tmp_path / "config.yaml")
    # early stopping, where EvalHook evaluates only when training ends: it would never stop
    cfg = tiny_cfg(tmp_path, *OPTS, "TEST.EVAL_PERIOD", 0, "PERSIST.BEST_METRIC", "bbox/AP",
                   "PERSIST.EARLY_STOP_PATIENCE", 2)
    with pytest.raises(ConfigError, match="PERSIST.EARLY_STOP_PATIENCE 2 watches evaluations "
                       "during training, and this run evaluates only when training ends"):
        train(cfg, trainer_cls=eval_trainer())
    assert not list(tmp_path.glob("*.pth")) and not os.path.exists(tmp_path / "config.yaml")


def test_an_eval_hook_told_not_to_evaluate_after_training_still_ends_the_run(tmp_path):
    """
    ``EvalHook(eval_after_train=False)`` in a trainer's own ``build_hooks``: no evaluation of
    the final weights, so none to compare with the best; the completed run failed there
    ("produced: nothing"), with no export, and again on every resume.
    """
    from detectron2.engine.hooks import EvalHook

    class NoFinalEval(eval_trainer()):
        def build_hooks(self):
            hooks = super().build_hooks()
            for h in hooks:
                if isinstance(h, EvalHook):
                    h._eval_after_train = False
            return hooks

    cfg = tiny_cfg(tmp_path, *OPTS, "SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 2,
                   "PERSIST.BEST_METRIC", "bbox/AP50", "PERSIST.EXPORT", True)
    train(cfg, trainer_cls=NoFinalEval)
    assert json.loads((tmp_path / "best.json").read_text())["iteration"] == 1
    assert (tmp_path / "export" / "manifest.json").is_file()


def test_detectron2s_best_checkpointer_writing_model_best_is_refused(tmp_path):
    """
    BestCheckpointer's default file_prefix writes model_best.pth, which BEST_METRIC makes a
    hard link to a checkpoint: its write (open "wb") rewrote that checkpoint's bytes, which
    then no longer matched their sha256. Refused before training.
    """
    from detectron2.engine.hooks import BestCheckpointer

    from d2persist import D2PersistError

    class WithBestCheckpointer(eval_trainer()):
        def build_hooks(self):
            return super().build_hooks() + [
                BestCheckpointer(2, self.checkpointer, "bbox/AP50", "max")]

    cfg = tiny_cfg(tmp_path, *OPTS, "SOLVER.MAX_ITER", 4, "PERSIST.BEST_METRIC", "bbox/AP50")
    with pytest.raises(D2PersistError, match=r"^detectron2's BestCheckpointer writes "
                                             r"model_best.pth, which d2persist makes a hard "
                                             r"link to a checkpoint .*: remove it;"):
        train(cfg, trainer_cls=WithBestCheckpointer)
    assert not list(tmp_path.glob("model_*.pth"))
