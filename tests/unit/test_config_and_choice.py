"""Options, config views and the one resume decision, without training (fast)."""

import logging
import os

import pytest
import torch
from detectron2.config import get_cfg

from d2persist import (
    ArtifactError,
    ConfigError,
    ConfigRoundTripError,
    OutputDirNotEmptyError,
    PersistCheckpointer,
    add_persist_config,
    run_config,
)
from d2persist.config import DEFAULT_OPTIONS
from d2persist.layout import LAST_CHECKPOINT, checkpoint_iteration, checkpoint_name
from d2persist.training.resume import choose_checkpoint, resume_or_load
from d2persist.training.state import build_resumable_train_loader


def test_defaults_are_the_ones_add_persist_config_defines():
    cfg = add_persist_config(get_cfg())
    assert dict(cfg.PERSIST) == DEFAULT_OPTIONS
    assert run_config(get_cfg()).options == DEFAULT_OPTIONS  # without add_persist_config


def test_unknown_option_and_malformed_extension_are_refused():
    cfg = add_persist_config(get_cfg())
    cfg.PERSIST.MAX_TO_KEP = 3
    with pytest.raises(ConfigRoundTripError, match="MAX_TO_KEP"):
        run_config(cfg)
    cfg = add_persist_config(get_cfg())
    cfg.PERSIST.CONFIG_EXTENSIONS = ["os:system"]
    with pytest.raises(ConfigRoundTripError, match="'os:system'.*add_\\*config"):
        run_config(cfg)


def test_checkpoint_names_round_trip():
    assert checkpoint_name(99) == "model_0000099.pth"
    assert checkpoint_iteration(checkpoint_name(12_345_678)) == 12_345_678
    assert checkpoint_iteration("model_final.pth") is None


def test_repeat_factor_sampler_is_refused_with_what_to_do():
    cfg = get_cfg()
    cfg.DATALOADER.SAMPLER_TRAIN = "RepeatFactorTrainingSampler"
    with pytest.raises(ConfigError, match="TrainingSampler.*build_detection_train_loader"):
        build_resumable_train_loader(cfg)


def _checkpointer(folder):
    return PersistCheckpointer(torch.nn.Linear(2, 2), str(folder))


def _write(ck, iteration):
    ck.write(checkpoint_name(iteration), {"model": ck.model.state_dict(), "iteration": iteration})


def test_choice_for_a_new_run(tmp_path):
    assert choose_checkpoint(str(tmp_path), resume=False) == ""
    assert choose_checkpoint(str(tmp_path / "missing"), resume=True) == ""
    _write(_checkpointer(tmp_path), 3)
    with pytest.raises(OutputDirNotEmptyError, match="--resume"):
        choose_checkpoint(str(tmp_path), resume=False)
    assert choose_checkpoint(str(tmp_path), resume=False, refuse_existing=False) == ""


def test_choice_when_resuming_falls_back_then_refuses_with_one_sentence(tmp_path):
    ck = _checkpointer(tmp_path)
    _write(ck, 1)
    _write(ck, 3)
    assert (tmp_path / LAST_CHECKPOINT).read_text() == "model_0000003.pth"
    assert choose_checkpoint(str(tmp_path), resume=True) == str(tmp_path / "model_0000003.pth")
    for it in (3, 1):
        (tmp_path / checkpoint_name(it)).write_bytes(b"garbage")
        if it == 3:  # the newest is broken: the older one is chosen
            assert choose_checkpoint(str(tmp_path), True) == str(tmp_path / checkpoint_name(1))
    with pytest.raises(ArtifactError, match="Cannot resume: no checkpoint .* verifies") as e:
        choose_checkpoint(str(tmp_path), resume=True)
    assert "already holds" not in str(e.value) and "\n" not in str(e.value)


def test_resume_or_load_loads_the_chosen_checkpoint(tmp_path):
    ck = _checkpointer(tmp_path)
    _write(ck, 5)
    fresh = _checkpointer(tmp_path)
    assert resume_or_load(fresh, "", resume=True)
    assert torch.equal(fresh.model.weight, ck.model.weight)
    other = _checkpointer(tmp_path / "new")
    assert not resume_or_load(other, "", resume=True)
    # nothing written by deciding; the run lock is taken (the folder is this process's now)
    assert os.listdir(tmp_path / "new") == [".d2persist.lock"]


def test_best_metric_bookkeeping(tmp_path, caplog):
    import json

    from d2persist.artifacts.view import RunView
    from d2persist.training.best import BestMetric

    best = BestMetric("segm/AP", "min")
    assert best.improves(3.0) and not best.improves(float("nan"))
    best.update(3.0, 9)
    assert best.improves(2.5) and not best.improves(3.0) and not best.improves(4.0)
    record = tmp_path / "best.json"
    record.write_text(json.dumps(dict(best.record(), value=1.5, iteration=19)))
    again = BestMetric("segm/AP", "min")
    again.load_state_dict(best.state_dict())  # what the checkpoint held
    run = RunView(str(tmp_path), "run")
    again.adopt(run.best_record())  # the final evaluation came after the last checkpoint
    assert (again.value, again.iteration) == (1.5, 19)
    other = BestMetric("bbox/AP", "min")
    other.adopt(run.best_record())  # another metric's record is ignored
    assert other.value is None
    # the right metric, but not a record (a value that is no number): ignored, with a warning
    record.write_text(json.dumps(dict(best.record(), value="high")))
    with caplog.at_level(logging.WARNING, logger="d2persist"):
        again.adopt(run.best_record())
    assert (again.value, again.iteration) == (1.5, 19)
    assert any("not a best-metric record" in r.getMessage() for r in caplog.records)
    record.write_text("[1, 2]")  # not even a JSON object: the view reads no record
    assert run.best_record() is None
    with pytest.raises(ConfigError, match="BEST_MODE"):
        BestMetric("segm/AP", "largest")


def test_best_metric_of_a_task_the_evaluation_did_not_report_is_skipped(caplog):
    # COCOEvaluator reports no segm while the model detects nothing yet: not a config error
    from d2persist.training.best import evaluation_value

    latest = {"bbox/AP": (0.5, 99), "bbox/AP50": (2.0, 99), "total_loss": (1.2, 99)}
    with caplog.at_level("WARNING", logger="d2persist.training.best"):
        assert evaluation_value(latest, "segm/AP", 99, {"total_loss"}) is None
    assert "produced no segm results" in caplog.text and "bbox/AP50" in caplog.text
    assert evaluation_value(latest, "bbox/AP50", 99) == 2.0
    with pytest.raises(ConfigError, match="'bbox/APX' is not a result .* bbox/AP, bbox/AP50"):
        evaluation_value(latest, "bbox/APX", 99, {"total_loss"})  # a typo in the task's metric
    with pytest.raises(ConfigError, match="produced: nothing"):
        evaluation_value({"total_loss": (1.2, 99)}, "segm/AP", 99, {"total_loss"})
    # two test datasets: DefaultTrainer.test nests the results by dataset (was skipped with
    # "produced no bbox results" at every evaluation: no best model, ever)
    nested = {"val_a/bbox/AP": (0.5, 99), "val_b/bbox/AP": (0.7, 99)}
    with pytest.raises(ConfigError, match=r"^PERSIST.BEST_METRIC 'bbox/AP' is reported per test "
                                          r"dataset .* \(val_a/bbox/AP, val_b/bbox/AP\): name "
                                          r"one of those\.$"):
        evaluation_value(nested, "bbox/AP", 99)
    assert evaluation_value(nested, "val_b/bbox/AP", 99) == 0.7
    with pytest.raises(ConfigError, match=r"'AP' is not a result .* bbox/AP"):  # no task: a typo
        evaluation_value(latest, "AP", 99, {"total_loss"})


@pytest.mark.parametrize("value", [-0.5, "a lot", None])
def test_int8_budget_must_be_a_number_of_points(value):
    from d2persist.runconfig import persist_options

    cfg = add_persist_config(get_cfg())
    cfg.PERSIST.INT8_BUDGET = value
    with pytest.raises(ConfigError, match="PERSIST.INT8_BUDGET must be a number"):
        persist_options(cfg)
    cfg.PERSIST.INT8_BUDGET = 0
    assert persist_options(cfg)["INT8_BUDGET"] == 0.0


# -- early stopping ---------------------------------------------------------------------------

@pytest.mark.parametrize("key, value", [("EARLY_STOP_PATIENCE", -1), ("EARLY_STOP_PATIENCE", 1.5),
                                        ("EARLY_STOP_PATIENCE", "x"),
                                        ("EARLY_STOP_PATIENCE", float("inf")),
                                        ("EARLY_STOP_MIN_DELTA", -0.1),
                                        ("EARLY_STOP_MIN_DELTA", float("nan"))])
def test_early_stop_options_refuse_bad_values_in_one_sentence(key, value):
    from d2persist.runconfig import persist_options

    cfg = add_persist_config(get_cfg())
    cfg.PERSIST.BEST_METRIC = "bbox/AP"
    cfg.PERSIST[key] = value
    with pytest.raises(ConfigError, match=f"PERSIST.{key} must be"):
        persist_options(cfg)
    cfg.PERSIST.EARLY_STOP_PATIENCE, cfg.PERSIST.EARLY_STOP_MIN_DELTA = 3, 0.5
    assert [persist_options(cfg)[k] for k in ("EARLY_STOP_PATIENCE", "EARLY_STOP_MIN_DELTA")] \
        == [3, 0.5]


def test_early_stopping_needs_the_metric_it_watches():
    from d2persist.runconfig import persist_options

    cfg = add_persist_config(get_cfg())
    cfg.PERSIST.EARLY_STOP_PATIENCE = 3
    with pytest.raises(ConfigError, match="EARLY_STOP_PATIENCE needs PERSIST.BEST_METRIC"):
        persist_options(cfg)


@pytest.mark.parametrize("mode, values, delta, stops_after", [
    ("max", [1, 2, 2, 2], 0.0, 3),           # two without improvement
    ("max", [1, 2, 2.05, 2.1], 0.1, 3),      # small gains do not count
    ("max", [1, 2, 2.2, 2.2, 2.35], 0.1, None),
    ("min", [5, 4, 4, 3, 3, 3], 0.0, 5),
    ("max", [1, float("nan"), float("nan")], 0.0, 2),  # NaN never improves
])
def test_early_stopping_counts_evaluations_without_improvement(mode, values, delta, stops_after):
    from d2persist.training.best import EarlyStopping

    early = EarlyStopping("bbox/AP", mode, 2, delta)
    stopped = None
    for i, v in enumerate(values):
        early.add(i, v)
        if early.should_stop():
            stopped = i
            break
    assert stopped == stops_after
    again = EarlyStopping("bbox/AP", mode, 2, delta)  # the history is its whole state
    again.load_state_dict(early.state_dict())
    assert again.status() == early.status()
    other = EarlyStopping("segm/AP", mode, 2, delta)  # kept for another metric: not taken
    other.load_state_dict(early.state_dict())
    assert other.history == []


def test_early_stopping_merges_what_was_evaluated_after_its_checkpoint():
    from d2persist.training.best import EarlyStopping

    early = EarlyStopping("bbox/AP", "max", 2)
    early.add(1, 10.0)
    early.add(3, 20.0)
    records = [{"iteration": it, "metrics": {"bbox/AP": v}}
               for it, v in ((1, 10.0), (3, 20.0), (5, 20.0), (7, 20.0))]
    early.merge(records, before=6)  # resumed at iteration 6: 7's evaluation is redone
    assert early.history == [(1, 10.0), (3, 20.0), (5, 20.0)]
    assert early.status() == {"best": 20.0, "best_iteration": 3, "without_improvement": 1}
    early.merge([{"iteration": 7, "metrics": {"bbox/AP": None}}], before=8)  # NaN, as written
    assert early.status()["without_improvement"] == 2 and early.should_stop()


def test_early_stop_options_are_lazyconfig_keys_too():
    from omegaconf import OmegaConf

    from d2persist.runconfig import persist_options

    cfg = OmegaConf.create({"train": {"persist": {"best_metric": "bbox/AP",
                                                  "early_stop_patience": 4,
                                                  "early_stop_min_delta": 0.5}}})
    opts = persist_options(cfg)
    assert (opts["EARLY_STOP_PATIENCE"], opts["EARLY_STOP_MIN_DELTA"]) == (4, 0.5)
    cfg.train.persist.best_metric = ""
    with pytest.raises(ConfigError, match="EARLY_STOP_PATIENCE needs PERSIST.BEST_METRIC"):
        persist_options(cfg)


# -- EMA weights and the validation loss ------------------------------------------------------

@pytest.mark.parametrize("key, value", [("EMA_DECAY", 1.0), ("EMA_DECAY", -0.1),
                                        ("EMA_DECAY", float("nan")), ("EMA_DECAY", "x"),
                                        ("EMA_DECAY", True), ("EMA_WARMUP", -1),
                                        ("EMA_WARMUP", float("inf")), ("EMA_WARMUP", 2.5),
                                        ("VAL_LOSS", "yes"),
                                        ("EMA_EVAL", 1)])
def test_ema_and_validation_options_refuse_bad_values_in_one_sentence(key, value):
    from d2persist.runconfig import persist_options

    cfg = add_persist_config(get_cfg())
    cfg.PERSIST[key] = value
    with pytest.raises(ConfigError, match=f"PERSIST.{key} must be"):
        persist_options(cfg)


@pytest.mark.parametrize("key, value, said", [
    ("EXPORT", "no", "PERSIST.EXPORT must be True or False, not 'no'."),
    ("PLOT", 0, "PERSIST.PLOT must be True or False, not 0."),
    ("SAVE_ON_INTERRUPT", "false", "PERSIST.SAVE_ON_INTERRUPT must be True or False"),
    ("STOP_SIGNALS", None, "PERSIST.STOP_SIGNALS must be a list of names ([] for none), not "
     "None."),
    ("EXPORT_FORMATS", None, "PERSIST.EXPORT_FORMATS must be a list of names"),
    ("CALIBRATION_IMAGES", "many", "PERSIST.CALIBRATION_IMAGES must be a whole number of "
     "images >= 1, not 'many'."),
    ("CALIBRATION_IMAGES", 2.5, "not 2.5."),
    ("INT8_BUDGET", None, "PERSIST.INT8_BUDGET must be a number of metric points >= 0, not "
     "None."),
    ("BEST_METRIC", "total_loss", "PERSIST.BEST_METRIC 'total_loss' is a value of training "
     "logged every iteration"),
    ("BEST_METRIC", "fast_rcnn/cls_accuracy", "is a value of training"),
    ("BEST_METRIC", "validation/total_loss", "PERSIST.BEST_METRIC 'validation/total_loss' is "
     "computed with PERSIST.VAL_LOSS True only."),
])
def test_options_that_would_misbehave_later_are_refused_up_front(key, value, said):
    """
    Each was taken and then ignored or misread: "no" as a truthy flag, None iterated
    mid-setup, a training value kept as the "best" (the highest loss, by default).
    """
    from omegaconf import OmegaConf

    from d2persist.runconfig import persist_options

    cfg = OmegaConf.create({"train": {"persist": {key.lower(): value}}})  # (yacs types them)
    with pytest.raises(ConfigError) as e:
        persist_options(cfg)
    assert said in str(e.value) and "\n" not in str(e.value)


def test_a_lazyconfig_keeps_as_many_checkpoints_as_its_checkpointer_says():
    """PersistHook replaces the PeriodicCheckpointer that honoured train.checkpointer."""
    from omegaconf import OmegaConf

    from d2persist.runconfig import persist_options

    cfg = OmegaConf.create({"train": {"checkpointer": {"period": 5, "max_to_keep": 7}}})
    assert persist_options(cfg)["MAX_TO_KEEP"] == 7
    cfg.train.persist = {"max_to_keep": 3}
    assert persist_options(cfg)["MAX_TO_KEEP"] == 3


def test_keypoint_sigmas_of_either_kind_of_config_and_of_a_list_of_evaluators():
    from d2persist.predict.evaluate import keypoint_sigmas

    assert keypoint_sigmas({"TEST": {"KEYPOINT_OKS_SIGMAS": [0.5]}}) == [0.5]
    evaluators = [{"_target_": "SemSegEvaluator"},  # the zoo's panoptic data config's list
                  {"_target_": "COCOEvaluator", "kpt_oks_sigmas": [0.5, 0.25]}]
    assert keypoint_sigmas({"dataloader": {"evaluator": evaluators}}) == [0.5, 0.25]
    assert keypoint_sigmas({"dataloader": {"evaluator": evaluators[1]}}) == [0.5, 0.25]
    assert keypoint_sigmas({"TEST": {}, "dataloader": {"evaluator": evaluators[0]}}) == []


def test_ema_and_validation_options_are_lazyconfig_keys_too():
    from omegaconf import OmegaConf

    from d2persist.runconfig import persist_options

    cfg = OmegaConf.create({"train": {"persist": {"ema_decay": 0.999, "ema_warmup": 100,
                                                  "ema_eval": False, "val_loss": True}}})
    opts = persist_options(cfg)
    assert [opts[k] for k in ("EMA_DECAY", "EMA_WARMUP", "EMA_EVAL", "VAL_LOSS")] == [
        0.999, 100, False, True]


def test_the_validation_loss_needs_a_test_dataset():
    cfg = add_persist_config(get_cfg())
    cfg.PERSIST.VAL_LOSS = True
    with pytest.raises(ConfigError, match="VAL_LOSS needs a test dataset"):
        run_config(cfg).check()


def test_ema_follows_the_model_and_swaps_it_both_ways():
    from d2persist.training.ema import ModelEMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(0.5)
    ema.attach(model)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()  # half-way to the new weights; the counter is copied
    average = ema.state_dict()["model"]
    assert torch.allclose(average["0.weight"], start["0.weight"] + 0.5)
    assert average["1.num_batches_tracked"].dtype == torch.long
    own = model[0].weight.detach().clone()
    with ema.applied():
        assert torch.equal(model[0].weight, average["0.weight"])
    assert torch.equal(model[0].weight, own)
    again = ModelEMA(0.5)
    again.load_state_dict(ema.state_dict())
    again.attach(model)  # continues the saved average, not the model's weights
    assert again.restored and again.updates == 1
    assert torch.equal(again.state_dict()["model"]["0.weight"], average["0.weight"])
    with pytest.raises(ValueError, match="do not fit this model"):
        _attach(ModelEMA(0.5), ema.state_dict(), torch.nn.Linear(3, 2))
    warm = ModelEMA(0.9, warmup=10)
    assert warm.current_decay() == pytest.approx(0.9 * (1 - 2.718281828 ** -0.1), rel=1e-6)


def _attach(ema, state, model):
    ema.load_state_dict(state)
    ema.attach(model)


def test_the_validation_loss_needs_annotations_in_the_test_dataset():
    from detectron2.data import DatasetCatalog

    from d2persist.training.validation import validation_batches

    name = "d2persist_unit_no_annotations"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [{"file_name": "x.png", "image_id": 0,
                                                "height": 8, "width": 8}])
    cfg = add_persist_config(get_cfg())
    cfg.DATASETS.TEST = (name,)
    cfg.PERSIST.VAL_LOSS = True
    with pytest.raises(ConfigError, match=f"test dataset '{name}' has none"):
        validation_batches(run_config(cfg))


def _yacs(**changes):
    cfg = add_persist_config(get_cfg())
    for key, value in changes.items():
        node, _, leaf = key.rpartition("__")
        target = cfg
        for part in node.split("__") if node else []:
            target = target[part]
        target[leaf] = value
    return cfg


@pytest.mark.parametrize("value", [".", "", "./", "/elsewhere", "../other_run", "a/../.."])
def test_an_export_folder_outside_the_run_or_the_run_itself_is_refused(value):
    with pytest.raises(ConfigError, match="EXPORT_DIR must be a folder inside OUTPUT_DIR"):
        run_config(_yacs(PERSIST__EXPORT_DIR=value))


def test_settings_no_run_can_train_with_are_refused_before_anything_is_built(tmp_path, caplog):
    (tmp_path / "afile").write_text("mine")
    cases = [({"OUTPUT_DIR": ""}, "OUTPUT_DIR is empty"),
             ({"OUTPUT_DIR": str(tmp_path / "afile")}, "afile is a file, not a folder"),
             ({"SOLVER__MAX_ITER": 0}, "SOLVER.MAX_ITER must be a number of iterations >= 1"),
             ({"SOLVER__CHECKPOINT_PERIOD": -2}, "SOLVER.CHECKPOINT_PERIOD must be a number"),
             ({"PERSIST__MAX_TO_KEEP": -1}, "PERSIST.MAX_TO_KEEP must be a whole number")]
    for changes, message in cases:
        with pytest.raises(ConfigError, match=message):
            run_config(_yacs(**{"OUTPUT_DIR": str(tmp_path / "run"), **changes})
                       ).check_settings()
    from d2persist.training.actions import start_run_folder

    quiet = run_config(_yacs(OUTPUT_DIR=str(tmp_path / "run"), SOLVER__CHECKPOINT_PERIOD=0))
    quiet.check_settings()  # 0 is allowed: no periodic checkpoints; said once, at the start
    assert "no checkpoint before the last iteration" not in caplog.text
    start_run_folder(quiet, 0)
    assert caplog.text.count("no checkpoint before the last iteration") == 1
    with pytest.raises(ConfigError, match="SOLVER.MAX_ITER must be"):  # the library's trainer
        from d2persist import PersistTrainer

        PersistTrainer(_yacs(OUTPUT_DIR=str(tmp_path / "run"), SOLVER__MAX_ITER=-3))


def test_a_mirror_onto_a_run_or_of_no_filesystem_is_refused(tmp_path):
    from d2persist.files.mirror import check_mirror
    from d2persist.layout import LOCK_NAME

    run, other = tmp_path / "run", tmp_path / "other"
    run.mkdir()
    other.mkdir()
    (other / LOCK_NAME).write_text("")
    cases = [("nosuch://x/y", r"cannot be used \(ValueError: Protocol not known: nosuch\)"),
             (f"file://{run}", "is the run's folder"), (str(run / "mirror"), "inside it"),
             (str(tmp_path), "or above it"), (f"file://{other}", "is another run's folder"),
             ("s3:/bucket/runs", "is neither a URL"), ("bucket/runs", "nor an absolute folder")]
    for url, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_mirror(url, str(run))
    check_mirror(f"file://{tmp_path / 'mirrors' / 'run'}", str(run))
    check_mirror("s3://bucket/runs/run", str(run))  # (not reached here: checked at upload)


def test_an_export_bundle_is_no_run_folder_and_a_dangling_last_checkpoint_is_named(tmp_path):
    bundle = tmp_path / "export"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    for resume in (False, True):
        with pytest.raises(OutputDirNotEmptyError, match="is an export bundle"):
            choose_checkpoint(str(bundle), resume=resume)
    run = tmp_path / "run"
    run.mkdir()
    (run / LAST_CHECKPOINT).write_text("model_0000009.pth")
    with pytest.raises(ArtifactError, match="names model_0000009.pth, which is not there"):
        choose_checkpoint(str(run), resume=True)


def test_a_d2persist_error_ending_training_is_logged_as_its_sentence():
    from d2persist.cli import _KnownErrorAsSentence

    def record(error):
        try:
            raise error
        except Exception:
            import sys

            rec = logging.LogRecord("detectron2.engine.train_loop", logging.ERROR, __file__, 1,
                                    "Exception during training:", (), sys.exc_info())
        assert _KnownErrorAsSentence().filter(rec)
        return rec

    mine = record(ConfigError("PERSIST.BEST_METRIC 'x' is not a result."))
    assert mine.getMessage() == "Training stopped: PERSIST.BEST_METRIC 'x' is not a result."
    assert mine.exc_info is None
    other = record(RuntimeError("a bug"))
    assert other.exc_info is not None and other.getMessage() == "Exception during training:"


def test_the_divergence_hint_of_a_lazyconfig_names_keys_detectron2s_configs_have():
    """It named train.clip_grad, which detectron2's LazyConfig loop never reads."""
    import re

    from detectron2 import model_zoo

    from d2persist.training.actions import DIVERGENCE_HINTS

    named = set(re.findall(r"\(([\w.]+)\)|a lower ([\w.]+)", DIVERGENCE_HINTS["lazy"]))
    keys = {k for pair in named for k in pair if k}
    assert keys == {"lr_multiplier.warmup_length", "optimizer.lr"}
    schedule = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_1x
    assert "warmup_length" in schedule
    assert "lr" in model_zoo.get_config("common/optim.py").SGD
