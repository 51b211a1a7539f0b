"""LazyConfig training (SimpleTrainer loop) through export and infer_single, on CPU."""

import json
import os

import pytest
import torch
import yaml
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog
from helpers import INFER_SINGLE, REPO, run_tool

from d2persist import UnsafeArtifactError, load_predictor
from d2persist.artifacts.bundle import persist_options_of_run
from d2persist.data.shapes import register_shapes
from d2persist.files.atomic import sha256_file
from d2persist.files.safe_load import safe_yaml_loads

LAZY_TRAIN_NET = os.path.join(REPO, "tools", "lazyconfig_train_net.py")
LAZY_TINY = [
    "train.max_iter=5",
    "train.checkpointer.period=2",
    "dataloader.train.mapper.augmentations.0.short_edge_length=[64]",
    "dataloader.train.mapper.augmentations.0.max_size=96",
    "dataloader.test.mapper.augmentations.0.short_edge_length=64",
    "dataloader.test.mapper.augmentations.0.max_size=96",
    "dataloader.test.dataset.names=shapes_val_10",  # the val split's first 10 images
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "model.roi_heads.box_predictor.test_score_thresh=0.0",
    # few proposals and boxes per image, as TINY_OPTS has them: the zoo's box head on 1000
    # proposals and its mask head on 100 boxes took ~1.5 s per image, a minute per evaluation
    "model.proposal_generator.pre_nms_topk=[200,100]",
    "model.proposal_generator.post_nms_topk=[64,32]",
    "model.roi_heads.box_predictor.test_topk_per_image=5",
    # and TINY_OPTS's head sizes: the zoo's 1024-wide box head and 256-channel mask head made
    # each training iteration several times slower than the model
    "model.roi_heads.batch_size_per_image=32",
    "model.roi_heads.box_head.fc_dims=[64,64]",
    "model.roi_heads.box_predictor.input_shape.channels=64",
    "model.roi_heads.mask_head.conv_dims=[32,32,32,32,32]",
    "lr_multiplier.scheduler.milestones=[3,4]",
    # seeded, and a gentler rate than the full schedule's: unseeded runs at 0.02 sometimes ended
    # with a model that proposes no box at all (CI saw one), and then there is nothing to compare
    "train.seed=7",
    "optimizer.lr=0.002",
]


@pytest.fixture(scope="module")
def lazy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lazy")
    # with the validation loss: the training mapper of a LazyConfig, the test resize
    res = run_tool(LAZY_TRAIN_NET, *LAZY_TINY, f"train.output_dir={out}",
                   "+train.persist.val_loss=True")
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    return out


def test_lazy_tool_refuses_in_one_sentence_before_building(tmp_path):
    out = tmp_path / "run"
    (tmp_path / "yacs.yaml").write_text("MODEL:\n  META_ARCHITECTURE: GeneralizedRCNN\n")
    cases = [
        (["--eval-only"], "lazyconfig_train_net.py trains; to evaluate a run, use"),
        (["--config-file", tmp_path], "is a folder."),
        (["--config-file", tmp_path / "yacs.yaml"], "has no 'train' section"),
        (["lr_multiplier.scheduler.milestones=[400,470]"],  # (LAZY_TINY's max_iter is 5)
         "The learning-rate schedule (lr_multiplier) does not fit train.max_iter 5: "),
        (["train.seed=abc"], "train.seed must be a whole number"),
        (["train.max_iter=x"], "train.max_iter must be a whole number"),
        (["+train.persist=5"], "train.persist must be a dict of d2persist's options, not 5."),
        (["train.init_checkpoint=/nowhere/model.pth"],
         "train.init_checkpoint /nowhere/model.pth does not exist."),
    ]
    for extra, message in cases:
        options = [a for a in extra if not str(a).count("=")]  # (before the overrides)
        overrides = [a for a in extra if str(a).count("=")]
        res = run_tool(LAZY_TRAIN_NET, *options, *LAZY_TINY, f"train.output_dir={out}",
                       *overrides)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("lazyconfig_train_net.py: error: ") and message in last, last
        assert not list(out.glob("model_*.pth"))  # refused before training


def test_lazy_run_writes_periodic_final_and_export(lazy_run):
    names = sorted(n for n in os.listdir(lazy_run) if n.endswith(".pth"))
    assert names == ["model_0000001.pth", "model_0000003.pth", "model_final.pth"]
    assert (lazy_run / "last_checkpoint").read_text() == "model_final.pth"
    saved = LazyConfig.load(str(lazy_run / "config.yaml"))  # as detectron2 reads it back
    assert saved.train.max_iter == 5
    manifest = json.loads((lazy_run / "export" / "manifest.json").read_text())
    assert manifest["config_kind"] == "lazy"
    assert manifest["metadata"]["thing_classes"] == ["circle", "square", "triangle"]
    assert manifest["input"]["min_size_test"] == 64
    # the export measured itself with the config's dataloader.evaluator, after its final
    # evaluation (do_test at the end of training)
    entry = manifest["evaluation"]
    assert (entry["dataset"], entry["evaluator"], entry["failed"]) == (
        "shapes_val_10", "COCOEvaluator", [])
    assert entry["reference"] and entry["backends"]["pytorch"] == entry["reference"]
    (record,) = json.loads((lazy_run / "evaluations.json").read_text())["evaluations"]
    assert record["iteration"] == 4 and {"bbox/AP", "segm/AP"} <= set(record["metrics"])
    losses = {k: v for k, v in record["metrics"].items() if k.startswith("validation/")}
    assert {"validation/loss_mask", "validation/loss_rpn_cls"} <= set(losses)
    assert losses["validation/total_loss"] == pytest.approx(
        sum(v for k, v in losses.items() if k != "validation/total_loss"))


def test_lazy_export_predicts_like_evaluation(lazy_run):
    from detectron2.data.detection_utils import read_image

    _, val = register_shapes()
    image = DatasetCatalog.get(val)[2]["file_name"]
    cfg = LazyConfig.load(str(lazy_run / "config.yaml"))
    model = instantiate(cfg.model)
    DetectionCheckpointer(model).load(str(lazy_run / "model_final.pth"))
    model.eval()
    mapper = instantiate(cfg.dataloader.test.mapper)
    h, w = read_image(image).shape[:2]
    with torch.no_grad():
        ref = model([mapper({"file_name": image, "height": h, "width": w})])[0]["instances"]
    got = load_predictor(str(lazy_run / "export"))(image).instances
    assert len(got) == len(ref) > 0
    torch.testing.assert_close(got.pred_boxes.tensor, ref.pred_boxes.tensor)
    res = run_tool(INFER_SINGLE, "--image", image, "--artifacts", lazy_run, "--json",
                   lazy_run / "p.json", "--confidence-threshold", 0)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(json.loads((lazy_run / "p.json").read_text())["instances"]) == len(ref)


@pytest.mark.parametrize("target", ["os.system", "torch.nn.parallel.distributed.os.system"])
def test_lazy_bundle_cannot_instantiate_arbitrary_callables(lazy_run, tmp_path, target):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(lazy_run / "export", bundle)
    marker = tmp_path / "pwned"
    cfg = safe_yaml_loads((bundle / "config.yaml").read_text())
    # the second walks from an allowed module (torch.nn) through its imports to os.system
    cfg["model"]["backbone"] = {"_target_": target, "command": f"touch {marker}"}
    (bundle / "config.yaml").write_text(yaml.dump(cfg))

    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["config.yaml"] = {"sha256": sha256_file(str(bundle / "config.yaml")),
                                        "size": (bundle / "config.yaml").stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsafeArtifactError, match=target):
        load_predictor(str(bundle))
    assert not marker.exists()


@pytest.mark.parametrize("export", [True, False])
def test_lazy_config_is_serialized_once_for_check_and_config_yaml(tmp_path, mocker, export):
    from d2persist import run_config

    cfg = LazyConfig.load(os.path.join(REPO, "configs", "shapes_mask_rcnn_R_18_FPN_lazy.py"))
    cfg.train.persist = {"export": export, "export_dir": "bundle", "stop_signals": ["SIGTERM"]}
    save = mocker.spy(LazyConfig, "save")
    run = run_config(cfg)
    run.check()
    run.check()
    run.write(str(tmp_path))

    assert save.call_count == 1  # the checked text is what config.yaml gets
    text = (tmp_path / "config.yaml").read_text()
    assert safe_yaml_loads(text)["train"]["seed"] == cfg.train.seed
    # its options where every reader of a run takes them (ls, verify, the predictors find the
    # export in EXPORT_DIR), as a yacs run's
    options = persist_options_of_run(str(tmp_path))
    assert (options["EXPORT"], options["EXPORT_DIR"], options["STOP_SIGNALS"]) == (
        export, "bundle", ["SIGTERM"])
    if export:
        assert text == run.dump()


def test_a_lazy_run_reading_rgb_is_predicted_in_rgb():
    """
    Evaluation reads images as the test loader's mapper says (image_format; the zoo's configs
    interpolate the training loader's), not as model.input_format (which only visualizers
    read): the export's contract and the rebuilt predictor take that one.
    """
    from d2persist import run_config
    from d2persist.predict.rebuild import build_model_from_config

    cfg = LazyConfig.load(os.path.join(REPO, "configs", "shapes_mask_rcnn_R_18_FPN_lazy.py"))
    cfg.dataloader.train.mapper.image_format = "RGB"
    assert cfg.model.input_format == "BGR"
    run = run_config(cfg)
    assert run.input_contract()["format"] == "RGB"
    assert build_model_from_config(safe_yaml_loads(run.dump()), "lazy")[2] == "RGB"


def test_a_list_of_evaluators_is_one_evaluator_as_detectron2_runs_it(tmp_path):
    """
    The zoo's panoptic data config gives dataloader.evaluator as a list; inference_on_dataset
    wraps it in DatasetEvaluators, and so does the run's evaluator (the export's evaluation
    called reset() on the list and failed when training ended, and on every resume).
    """
    from detectron2.evaluation import DatasetEvaluators

    from d2persist import run_config

    register_shapes()
    cfg = LazyConfig.load(os.path.join(REPO, "configs", "shapes_mask_rcnn_R_18_FPN_lazy.py"))
    cfg.dataloader.evaluator.output_dir = str(tmp_path)
    cfg.dataloader.evaluator.dataset_name = "shapes_val_10"  # (not relative to the list)
    cfg.dataloader.evaluator = [cfg.dataloader.evaluator, cfg.dataloader.evaluator]
    evaluator = run_config(cfg).build_evaluator(None, "shapes_val_10")
    assert isinstance(evaluator, DatasetEvaluators) and len(evaluator._evaluators) == 2


def test_a_lazy_run_resumed_with_another_config_names_the_changes(tmp_path, caplog):
    import logging

    from d2persist import run_config
    from d2persist.training.actions import _note_config_changes

    cfg = LazyConfig.load(os.path.join(REPO, "configs", "shapes_mask_rcnn_R_18_FPN_lazy.py"))
    run_config(cfg).write(str(tmp_path))
    cfg.optimizer.lr, cfg.train.persist = 0.5, {"max_to_keep": 2}
    with caplog.at_level(logging.WARNING, logger="d2persist"):
        _note_config_changes(run_config(cfg), str(tmp_path))
    said = [r.getMessage() for r in caplog.records if "differs from its" in r.getMessage()]
    assert len(said) == 1 and "optimizer.lr (" in said[0] and "persist" not in said[0]


def test_a_test_resize_the_onnx_graph_cannot_do_is_named_in_the_contract():
    """
    The ONNX predictor resizes to one size, bilinear: a LazyConfig's test ResizeShortestEdge
    of several sizes or another interpolation is listed as an augmentation it does not apply
    (the ONNX export refuses it; the PyTorch predictor applies it as evaluation does).
    """
    from d2persist import run_config

    cfg = LazyConfig.load(os.path.join(REPO, "configs", "shapes_mask_rcnn_R_18_FPN_lazy.py"))
    resize = cfg.dataloader.test.mapper.augmentations[0]
    assert "other_test_augmentations" not in run_config(cfg).input_contract()
    for key, value in (("interp", 0), ("short_edge_length", [64, 80])):
        saved = resize.get(key)
        resize[key] = value
        others = run_config(cfg).input_contract().get("other_test_augmentations")
        assert others and "ResizeShortestEdge of sizes" in others[0], others
        resize[key] = saved if saved is not None else 2
