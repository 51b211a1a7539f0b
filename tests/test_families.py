"""
Every model family of detectron2's model zoo, not only Mask R-CNN: keypoint R-CNN, RetinaNet,
Cascade and C4 R-CNN, semantic FPN, Panoptic FPN and RPN each train a few iterations from their
zoo config (made tiny) through PersistHook on the built-in shapes data for their task, export
ONNX, and predict with both backends exactly as the family's evaluation path does, on the
awkward images; their JSON carries every output, their pictures draw it, and the export's
self-evaluation scores each with the family's own metric.
"""

import functools
import json
import os

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from helpers import (
    FAMILIES,
    INFER_SINGLE,
    PREFIX,
    REPO,
    family_cfg,
    family_trainer,
    run_tool,
    train,
)
from test_predictor import _make

from d2persist import add_persist_config, load_predictor
from d2persist.data.shapes import KEYPOINT_OKS_SIGMAS, SHAPE_KEYPOINTS, register_shapes
from d2persist.predict.outputs import MIN_DRAW_SIZE, rle_decode
from d2persist.predict.predictor import arrays_of

KINDS = ["plain", "gray", "rgba", "exif", "large"]
_RUNS = {}


def trained(name, tmp_path_factory):
    """The run folder of one tiny trained run of family ``name``, trained once a session."""
    if name not in _RUNS:
        out = tmp_path_factory.mktemp(name)
        train(family_cfg(name, out), trainer_cls=family_trainer())
        _RUNS[name] = out
    return _RUNS[name]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """``(name, run folder)`` of each family."""
    return request.param, trained(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def val_image():
    register_shapes(PREFIX, num_val=10)
    return DatasetCatalog.get(f"{PREFIX}_val")[3]["file_name"]


@functools.lru_cache(maxsize=None)
def predictor(run, backend="pytorch"):
    """The run's predictor, loaded once per backend (both are stateless between images)."""
    return load_predictor(str(run), backend=backend)


@functools.lru_cache(maxsize=None)
def _evaluation_model(run):
    cfg = get_cfg()
    add_persist_config(cfg)
    cfg.merge_from_file(str(run / "config.yaml"))
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(run / "model_final.pth"))
    return cfg, model.eval(), DatasetMapper(cfg, is_train=False)


def evaluation_path(run, image_path):
    """What the family's evaluation computes for this file: stock detectron2 only."""
    cfg, model, mapper = _evaluation_model(run)
    h, w = read_image(image_path, format=cfg.INPUT.FORMAT).shape[:2]
    data = mapper({"file_name": image_path, "height": h, "width": w, "image_id": 0})
    with torch.no_grad():
        return arrays_of(model([data])[0], h, w)


def _match(ref, got, score_tol, box_tol):
    """Pairs (i in ref, j in got) of the same detection: class, score and box within bounds."""
    pairs, used = [], set()
    for i in range(len(ref.scores)):
        for j in np.flatnonzero((np.abs(got.scores - ref.scores[i]) <= score_tol)
                                & (got.classes == ref.classes[i])):
            if j not in used and np.abs(got.boxes[j] - ref.boxes[i]).max() <= box_tol:
                pairs.append((i, j))
                used.add(j)
                break
    return pairs


def assert_same(ref, got, exact):
    """
    ``got`` predicts what ``ref`` does: exactly (the PyTorch path), or within the ONNX bar:
    the same detections and classes, scores within 1e-3, boxes within 0.05 px, mask IoU
    >= 0.99, keypoints within 0.05 px, semantic and panoptic maps equal on >= 99.9% of pixels.
    """
    score_tol, box_tol = (1e-5, 1e-3) if exact else (1e-3, 0.05)
    if ref.boxes is not None:
        assert len(got.boxes) == len(ref.boxes) > 0
        pairs = _match(ref, got, score_tol, box_tol)
        # at the per-image limit, detections whose scores tie within float error may trade
        # places (a model of a few iterations scores many anchors alike): those only
        cut = ref.scores.min() + score_tol
        alone = [ref.scores[i] for i in set(range(len(ref.boxes))) - {i for i, _ in pairs}]
        assert len(alone) == 0 or (not exact and max(alone) <= cut and len(alone) <= 2), \
            f"{len(pairs)} of {len(ref.boxes)} matched"
        for i, j in pairs:
            if ref.masks is not None:
                union = (ref.masks[i] | got.masks[j]).sum()
                assert union == 0 or (ref.masks[i] & got.masks[j]).sum() / union >= 0.99
            if ref.keypoints is not None:
                np.testing.assert_allclose(got.keypoints[j][:, :2], ref.keypoints[i][:, :2],
                                           atol=box_tol, rtol=0)
                np.testing.assert_allclose(got.keypoints[j][:, 2], ref.keypoints[i][:, 2],
                                           atol=score_tol, rtol=1e-4)
    for key in ("sem_seg", "panoptic"):
        if getattr(ref, key) is not None:
            agree = (getattr(ref, key) == getattr(got, key)).mean()
            assert agree >= (1.0 if exact else 0.999), f"{key}: {agree:.5f} of the pixels"
    if ref.panoptic is not None:
        assert [(s["id"], s["isthing"], s["category_id"]) for s in ref.segments_info] == \
            [(s["id"], s["isthing"], s["category_id"]) for s in got.segments_info]
    if ref.proposals is not None:
        assert len(got.proposals) == len(ref.proposals) > 0
        np.testing.assert_allclose(got.proposals, ref.proposals, atol=box_tol, rtol=0)
        np.testing.assert_allclose(got.objectness, ref.objectness, atol=score_tol, rtol=1e-4)


def test_every_family_exports_its_onnx_graph(family):
    name, run = family
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    assert "error" not in manifest["onnx"], manifest["onnx"]
    assert manifest["onnx"]["task"] == FAMILIES[name][2]
    assert "model.onnx" in manifest["files"]


@pytest.mark.parametrize("kind", KINDS)
def test_both_backends_predict_as_the_family_evaluates(family, val_image, tmp_path, kind):
    name, run = family
    image = _make(kind, val_image, tmp_path)
    ref = evaluation_path(run, image)
    if ref.sem_seg is not None:  # a map of one class would compare nothing
        assert len(np.unique(ref.sem_seg)) > 1
    assert_same(ref, predictor(run)(image).arrays, exact=True)
    assert_same(ref, predictor(run, "onnxruntime")(image).arrays, exact=False)


def test_the_comparison_can_fail(family, val_image, tmp_path):
    """A prediction on another image is told apart by the same comparison."""
    name, run = family
    other = DatasetCatalog.get(f"{PREFIX}_val")[5]["file_name"]
    with pytest.raises(AssertionError):
        assert_same(evaluation_path(run, val_image),
                    predictor(run, "onnxruntime")(other).arrays, exact=False)


def _dense(items, shape):
    """The class map that COCO RLE items (``sem_seg``) tile."""
    out = np.full(shape, -1, dtype=np.int64)
    for item in items:
        mask = rle_decode(item["segmentation"])
        assert mask.sum() == item["area"] and (out[mask] == -1).all()
        out[mask] = item.get("id", item["category_id"])
    return out


def test_json_carries_every_output_and_pictures_draw_it(family, val_image):
    name, run = family
    preds = {b: predictor(run, b)(val_image) for b in ("pytorch", "onnxruntime")}
    data = {b: p.to_json(image_name=val_image) for b, p in preds.items()}
    expected = {"keypoint": {"keypoint_names"}, "semantic": {"sem_seg"},
                "panoptic": {"sem_seg", "panoptic_seg"}, "rpn": {"proposals"}}.get(name, set())
    for got in data.values():
        assert set(got) == {"image", "height", "width", "instances"} | expected
        json.dumps(got)  # JSON data only
    pt = data["pytorch"]
    arrays = preds["pytorch"].arrays
    shape = (pt["height"], pt["width"])
    if name == "keypoint":
        assert pt["keypoint_names"] == SHAPE_KEYPOINTS
        assert all(len(i["keypoints"]) == len(SHAPE_KEYPOINTS) for i in pt["instances"])
    if name == "semantic":
        np.testing.assert_array_equal(_dense(pt["sem_seg"], shape), arrays.sem_seg)
        assert {i["category_name"] for i in pt["sem_seg"]} <= {
            "background", "circle", "square", "triangle"}
    if name == "panoptic":
        segments = pt["panoptic_seg"]["segments_info"]
        assert segments, "no panoptic segment"
        np.testing.assert_array_equal(_dense(segments, shape),
                                      np.where(arrays.panoptic == 0, -1, arrays.panoptic))
        assert {s["category_name"] for s in segments if not s["isthing"]} <= {"background"}
    if name == "rpn":
        assert len(pt["proposals"]) == 20 and pt["instances"] == []
    pictures = {b: p.draw(None) for b, p in preds.items()}
    assert min(pictures["pytorch"].shape[:2]) >= MIN_DRAW_SIZE
    onnx = preds["onnxruntime"].arrays
    same = name in ("semantic", "panoptic") and np.array_equal(arrays.sem_seg, onnx.sem_seg) and (
        name == "semantic" or (np.array_equal(arrays.panoptic, onnx.panoptic) and [
            (s["id"], s["category_id"], round(s.get("score", 1), 2)) for s in arrays.segments_info
        ] == [(s["id"], s["category_id"], round(s.get("score", 1), 2))
              for s in onnx.segments_info]))
    if same:  # equal maps and labels (as here on this machine): equal pictures
        np.testing.assert_array_equal(pictures["pytorch"], pictures["onnxruntime"])


#: The family's own metric in the self-evaluation, by family.
METRIC = {"keypoint": "keypoints/AP", "semantic": "sem_seg/mIoU", "panoptic": "panoptic_seg/PQ"}


@pytest.mark.parametrize("name", list(METRIC))
def test_export_scores_itself_with_the_family_metric(name, tmp_path_factory):
    run = trained(name, tmp_path_factory)
    entry = json.loads((run / "export" / "manifest.json").read_text())["evaluation"]
    assert entry["failed"] == [], entry["errors"]
    for backend in ("pytorch", "onnxruntime"):
        assert entry["backends"][backend].get(METRIC[name]) is not None, entry["backends"]
    assert entry["reference"][METRIC[name]] == entry["backends"]["pytorch"][METRIC[name]]
    assert entry["max_difference"]["onnxruntime"] <= 0.1


def test_infer_single_writes_panoptic_json_and_picture(tmp_path, tmp_path_factory, val_image):
    run = trained("panoptic", tmp_path_factory)
    res = run_tool(INFER_SINGLE, "--image", val_image, "--artifacts", run, "--backend",
                   "onnxruntime", "--confidence-threshold", 0, "--output", tmp_path / "p.png",
                   "--json", tmp_path / "p.json", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["panoptic_seg"]["segments_info"] and data["sem_seg"]
    assert (tmp_path / "p.png").stat().st_size > 0


def _dataset_files(name, folder):
    """The family's test set as files evaluate.py reads: (kwargs of its evaluate_* function)."""
    from detectron2.data.datasets.coco import convert_to_coco_json

    from d2persist.data.shapes import ShapesSpec, label_folder

    suffix = FAMILIES[name][3]
    records = DatasetCatalog.get(f"{PREFIX}{suffix}_val")
    images = os.path.dirname(records[0]["file_name"])
    labels = label_folder(ShapesSpec(10, 128, 1_000_003))
    assert os.path.dirname(records[0].get("sem_seg_file_name", labels + "/x")).startswith(labels)
    if name == "keypoint":
        path = str(folder / "coco.json")
        convert_to_coco_json(f"{PREFIX}{suffix}_val", path, allow_cached=False)
        return "coco", {"coco_json": path, "image_root": ""}
    if name == "semantic":
        return "sem_seg", {"label_dir": os.path.join(labels, "sem"), "image_root": images}
    return "panoptic", {"panoptic_json": os.path.join(labels, "panoptic.json"),
                        "panoptic_root": os.path.join(labels, "panoptic"), "image_root": images}


@pytest.mark.parametrize("name", list(METRIC))
def test_evaluate_scores_as_detectron2s_evaluator(name, tmp_path, tmp_path_factory):
    """tools/evaluate.py's metrics = the in-training evaluation's (PyTorch), within 0.1 (ORT)."""
    from d2persist.predict import evaluate as ev

    run = trained(name, tmp_path_factory)
    training = json.loads((run / "export" / "manifest.json").read_text())["evaluation"]
    training = training["reference"]
    kind, files = _dataset_files(name, tmp_path)
    sigmas = ev.config_keypoint_sigmas(str(run))
    assert sigmas == (KEYPOINT_OKS_SIGMAS if name == "keypoint" else [])
    for backend, tolerance in (("pytorch", 1e-6), ("onnxruntime", 0.1)):
        p = predictor(run, backend)
        if kind == "coco":
            got = ev.evaluate_coco(p, kpt_oks_sigmas=sigmas, **files)
        elif kind == "sem_seg":
            got = ev.evaluate_sem_seg(p, **files)
        else:
            got = ev.evaluate_panoptic(p, **files)
        flat = {f"{task}/{k}": v for task, m in got.items() for k, v in m.items()}
        compared = [k for k in training if k in flat and not k.split("/")[1].startswith("AP-")]
        assert METRIC[name] in compared, sorted(flat)
        for key in compared:
            want, have = training[key], flat[key]
            if want is None:  # NaN in training: NaN here
                assert have != have, (backend, key, have)
            else:
                assert abs(have - want) <= tolerance, (backend, key, have, want)
    if kind == "panoptic":  # COCO's stuff names ("sky-other-merged"), which detectron2 shortens
        coco = json.loads(open(files["panoptic_json"]).read())
        for c in coco["categories"]:
            if not c["isthing"]:
                c["name"] += "-other-merged"
        renamed = tmp_path / "coco_names.json"
        renamed.write_text(json.dumps(coco))
        assert ev.evaluate_panoptic(p, **dict(files, panoptic_json=str(renamed))) == got


def test_evaluate_tool_scores_panoptic_without_torch(tmp_path, tmp_path_factory):
    import subprocess
    import sys

    from helpers import WITHOUT_TORCH, tool_env

    run = trained("panoptic", tmp_path_factory)
    _, files = _dataset_files("panoptic", tmp_path)
    res = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, os.path.join(REPO, "tools", "evaluate.py"),
         "--artifacts", str(run), "--panoptic-json", files["panoptic_json"],
         "--panoptic-root", files["panoptic_root"], "--image-root", files["image_root"],
         "--json", str(tmp_path / "m.json")],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "PQ" in res.stdout and "weights:" in res.stdout
    training = json.loads((run / "export" / "manifest.json").read_text())["evaluation"]
    got = json.loads((tmp_path / "m.json").read_text())["panoptic_seg"]["PQ"]
    assert abs(got - training["reference"]["panoptic_seg/PQ"]) <= 0.1
    missing = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "evaluate.py"), "--artifacts", str(run),
         "--panoptic-json", files["panoptic_json"]], capture_output=True, text=True,
        timeout=120, cwd=REPO, env=tool_env())
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "--panoptic-root" in missing.stderr.strip().splitlines()[-1]


#: a loss term each family's model computes in training mode
_TERMS = {"keypoint": "loss_keypoint", "semantic": "loss_sem_seg", "panoptic": "loss_sem_seg",
          "retinanet": "loss_cls", "rpn": "loss_rpn_cls", "cascade": "loss_cls_stage2",
          "c4": "loss_mask"}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_has_a_validation_loss_that_leaves_training_as_it_was(name,
                                                                           tmp_path_factory):
    """
    PERSIST.VAL_LOSS's pass over the family's val images, with its trained weights: its loss
    terms, the same in any order of the images, and the model (buffers, modes, plain numbers
    such as RetinaNet's loss_normalizer) and the RNGs as they were.
    """
    from d2persist import run_config
    from d2persist.training.state import get_rng_state
    from d2persist.training.validation import validation_batches, validation_loss

    out = trained(name, tmp_path_factory)
    suffix = FAMILIES[name][3]
    cfg = family_cfg(name, out)
    cfg.merge_from_list(["DATASETS.TEST", (f"{PREFIX}{suffix}_val",), "PERSIST.VAL_LOSS", True])
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(out / "model_final.pth"))
    model.train()
    loss = torch.ones(1)  # a training forward sets the numbers training keeps (loss_normalizer)
    with torch.no_grad():
        from detectron2.utils.events import EventStorage

        batch = next(iter(validation_batches(run_config(cfg))))[1]
        with EventStorage():
            loss = sum(model([batch]).values())
    assert torch.isfinite(loss)

    def numbers():
        return {(n, k): v for n, m in model.named_modules() for k, v in vars(m).items()
                if isinstance(v, (int, float))}

    images = list(validation_batches(run_config(cfg)))  # (a loader draws its seed)
    before = (numbers(), {k: v.clone() for k, v in model.state_dict().items()},
              get_rng_state()["torch"].clone())
    losses = validation_loss(model, images)
    assert f"validation/{_TERMS[name]}" in losses and "validation/total_loss" in losses
    assert all(np.isfinite(v) for v in losses.values())
    assert validation_loss(model, images[::-1]) == losses
    assert numbers() == before[0] and model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[1][k]), k
    assert torch.equal(get_rng_state()["torch"], before[2])
