"""
Fidelity: load_predictor / infer_single give what the training-time evaluation path gives
(``DatasetMapper(cfg, is_train=False)`` + the model in eval mode), for every image kind that
trips up hand-written inference code.
"""

import json

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from helpers import INFER_SINGLE, WITHOUT_TORCH, run_tool, tiny_cfg, train
from PIL import Image

from d2persist import InputImageError, load_predictor

# every box is kept, so that there is much to compare even after a few iterations
ALL_BOXES = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0]
ONNX = ["PERSIST.EXPORT_FORMATS", "['safetensors', 'onnx']"]


def _train(out, *opts):
    train(tiny_cfg(out, *ALL_BOXES, "SOLVER.MAX_ITER", 3, *ONNX, *opts))
    return out


@pytest.fixture(scope="module")
def bgr_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("bgr"))


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("rgb"), "INPUT.FORMAT", "RGB",
                  "MODEL.PIXEL_MEAN", [120.0, 110.0, 100.0], "MODEL.PIXEL_STD", [50.0, 60.0, 70.0])


@pytest.fixture(scope="module")
def faster_run(tmp_path_factory):
    """Faster R-CNN: boxes only."""
    return _train(tmp_path_factory.mktemp("faster"), "MODEL.MASK_ON", False)


@pytest.fixture(scope="module")
def val_image():
    from d2persist.data.shapes import register_shapes

    _, val = register_shapes()
    return DatasetCatalog.get(val)[0]["file_name"]


def evaluation_path(run, image_path):
    """What evaluation during training computes for this file: stock detectron2 only."""
    cfg = get_cfg()
    cfg.merge_from_file(str(run / "config.yaml"))
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(run / "model_final.pth"))
    model.eval()
    h, w = read_image(image_path, format=cfg.INPUT.FORMAT).shape[:2]
    data = DatasetMapper(cfg, is_train=False)(
        {"file_name": image_path, "height": h, "width": w, "image_id": 0}
    )
    with torch.no_grad():
        return model([data])[0]["instances"].to("cpu")


def assert_same_instances(a, b):
    assert len(a) == len(b) > 0
    assert torch.equal(a.pred_classes, b.pred_classes)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-3, rtol=1e-5)
    if a.has("pred_masks"):
        assert (a.pred_masks != b.pred_masks).float().mean() < 1e-3


def _make(kind, src, folder):
    rgb = np.asarray(Image.open(src).convert("RGB"))
    path = folder / f"{kind}.png"
    if kind == "gray":
        Image.fromarray(rgb).convert("L").save(path)
    elif kind == "rgba":
        alpha = np.linspace(40, 255, rgb.shape[0] * rgb.shape[1]).reshape(rgb.shape[:2])
        Image.fromarray(np.dstack([rgb, alpha.astype(np.uint8)]), "RGBA").save(path)
    elif kind == "exif":
        path = folder / "exif.jpg"
        exif = Image.Exif()
        exif[0x0112] = 6  # stored rotated: viewers (and detectron2) turn it 90 degrees
        Image.fromarray(rgb[:, :96]).save(path, exif=exif, quality=95)
    elif kind == "large":  # 2.5x the training size
        h, w = rgb.shape[:2]
        Image.fromarray(rgb).resize((int(w * 2.5), int(h * 2.5)), Image.BILINEAR).save(path)
    else:
        Image.fromarray(rgb).save(path)
    return str(path)


@pytest.mark.parametrize("kind", ["plain", "gray", "rgba", "exif", "large"])
def test_predictor_matches_evaluation_path(bgr_run, val_image, tmp_path, kind):
    image = _make(kind, val_image, tmp_path)
    predictor = load_predictor(str(bgr_run))
    pred = predictor(image)
    assert_same_instances(pred.instances, evaluation_path(bgr_run, image))
    assert pred.class_names == ["circle", "square", "triangle"]
    from_bytes = predictor(open(image, "rb").read())  # the file's bytes, as the file
    assert_same_instances(from_bytes.instances, pred.instances)
    if kind == "exif":  # the prediction is in the upright (rotated) frame
        assert (pred.height, pred.width) == (96, 128)


def test_rgb_model_with_custom_normalization(rgb_run, val_image, tmp_path):
    manifest = json.loads((rgb_run / "export" / "manifest.json").read_text())
    assert manifest["input"]["format"] == "RGB"
    assert manifest["input"]["pixel_std"] == [50.0, 60.0, 70.0]
    for kind in ("plain", "large"):
        image = _make(kind, val_image, tmp_path)
        assert_same_instances(load_predictor(str(rgb_run))(image).instances,
                              evaluation_path(rgb_run, image))


def test_naive_recipe_differs_so_the_comparison_can_fail(rgb_run, val_image, tmp_path):
    """Feeding cv2.imread's BGR array to an RGB model, unresized, is what users often do."""
    image = _make("large", val_image, tmp_path)
    predictor = load_predictor(str(rgb_run))
    raw = torch.as_tensor(cv2.imread(image).transpose(2, 0, 1).copy())
    h, w = raw.shape[1:]
    with torch.no_grad():
        naive = predictor.model([{"image": raw, "height": h, "width": w}])[0]["instances"]
    with pytest.raises(AssertionError):
        assert_same_instances(naive, evaluation_path(rgb_run, image))


def test_array_input_needs_and_honours_channel_order(bgr_run, val_image):
    predictor = load_predictor(str(bgr_run / "export"))
    from_file = predictor(val_image).instances
    bgr = cv2.imread(val_image)
    assert_same_instances(predictor(bgr, channel_order="BGR").instances, from_file)
    assert_same_instances(predictor(bgr[:, :, ::-1], channel_order="RGB").instances, from_file)
    with pytest.raises(InputImageError, match="channel_order"):
        predictor(bgr)


def test_an_image_too_thin_for_the_test_resize_is_one_sentence_everywhere(bgr_run, tmp_path):
    """
    A 200x1 image: at the test size (64, at most 96) one side resizes to 0 pixels, which PIL
    refuses with a ValueError: a traceback from infer_single, the end of a whole ``predict``
    job (and of every rerun), a 500 from ``serve``. Now one sentence, an error record, a 400.
    """
    from d2persist.scale.batch import predict_source
    from d2persist.scale.serve import Endpoint

    thin = tmp_path / "src" / "thin.png"
    thin.parent.mkdir()
    Image.new("RGB", (200, 1), (90, 120, 200)).save(thin)
    for backend in ("pytorch", "onnxruntime"):
        predictor = load_predictor(str(bgr_run / "export"), backend=backend)
        with pytest.raises(InputImageError, match=r"^An image of 200x1 pixels cannot be "
                                                  r"resized for the model"):
            predictor(str(thin))
        record = predict_source(predictor, str(thin.parent), str(tmp_path / backend))
        assert record["counts"]["failed"] == 1, record
        error = json.loads((tmp_path / backend / "thin.png.error.json").read_text())["error"]
        assert error.startswith(f"Image {thin}: An image of 200x1 pixels"), error
        [(status, answer)] = Endpoint(lambda threads, p=predictor: p).predict_many(
            [(thin.read_bytes(), "upload", 0.5)])
        assert status == 400 and "200x1 pixels" in answer["error"], answer


def test_checkpoint_folder_without_export_predicts_like_export(bgr_run, val_image, tmp_path):
    import shutil

    run = tmp_path / "interrupted"
    shutil.copytree(bgr_run, run, ignore=shutil.ignore_patterns("export"))
    from_ckpt = load_predictor(str(run))
    assert from_ckpt.class_names == ["circle", "square", "triangle"]  # from metadata.json
    assert_same_instances(from_ckpt(val_image).instances,
                          load_predictor(str(bgr_run / "export"))(val_image).instances)


def test_export_is_relocatable_and_small(bgr_run, tmp_path, val_image):
    import shutil

    moved = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(bgr_run / "export", moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    assert manifest["iteration"] == 2
    assert manifest["metadata"]["thing_classes"] == ["circle", "square", "triangle"]
    assert set(manifest["files"]) == {"config.yaml", "model.safetensors", "model.onnx"}
    assert set(manifest["versions"]) == {"d2persist", "detectron2", "torch"}
    ratio = (moved / "model.safetensors").stat().st_size / (bgr_run / "model_final.pth").stat(
    ).st_size
    assert ratio <= 0.55
    assert len(load_predictor(str(moved))(val_image).instances) > 0


def test_infer_single_json_matches_evaluation_path(bgr_run, val_image, tmp_path):
    image = _make("large", val_image, tmp_path)
    res = run_tool(INFER_SINGLE, "--image", image, "--artifacts", bgr_run,
                   "--confidence-threshold", 0, "--json", tmp_path / "p.json",
                   "--output", tmp_path / "p.png")
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((tmp_path / "p.json").read_text())
    ref = evaluation_path(bgr_run, image)
    assert (data["height"], data["width"]) == (320, 320)
    assert len(data["instances"]) == len(ref)
    got = torch.tensor([i["bbox"] for i in data["instances"]])
    torch.testing.assert_close(got, ref.pred_boxes.tensor, atol=1e-3, rtol=1e-5)
    assert [i["category_name"] for i in data["instances"]] == [
        ["circle", "square", "triangle"][c] for c in ref.pred_classes.tolist()
    ]
    assert all(set(i["segmentation"]) == {"size", "counts"} for i in data["instances"])
    vis = cv2.imread(str(tmp_path / "p.png"))
    assert vis.shape[:2] == (512, 512)  # a 320 px image is drawn upscaled to 512 px


def assert_onnx_matches(pred, ref):
    """ONNX Runtime's prediction against the evaluation path, within the export's tolerances."""
    assert len(pred) == len(ref) > 0
    np.testing.assert_array_equal(pred.classes, ref.pred_classes.numpy())
    np.testing.assert_allclose(pred.scores, ref.scores.numpy(), rtol=0, atol=1e-3)
    np.testing.assert_allclose(pred.boxes, ref.pred_boxes.tensor.numpy(), rtol=0, atol=0.05)
    if not ref.has("pred_masks"):
        assert pred.masks is None
        return
    want = ref.pred_masks.numpy()
    assert pred.masks.shape == want.shape
    for got, ref_mask in zip(pred.masks, want):
        union = (got | ref_mask).sum()
        assert union == 0 or (got & ref_mask).sum() / union >= 0.99


@pytest.mark.parametrize("run", ["bgr_run", "rgb_run", "faster_run"])
@pytest.mark.parametrize("kind", ["gray", "rgba", "exif", "large"])
def test_onnxruntime_matches_evaluation_path(request, run, kind, val_image, tmp_path):
    folder = request.getfixturevalue(run)
    image = _make(kind, val_image, tmp_path)
    predictor = load_predictor(str(folder), backend="onnxruntime")
    pred = predictor(image)
    assert_onnx_matches(pred, evaluation_path(folder, image))
    assert pred.class_names == ["circle", "square", "triangle"]
    from_bytes = predictor(open(image, "rb").read())  # the file's bytes, as the file
    for name in ("boxes", "scores", "classes", "masks"):
        np.testing.assert_array_equal(getattr(from_bytes, name), getattr(pred, name))


def test_onnx_comparison_can_fail_without_the_resize(rgb_run, val_image, tmp_path):
    from d2persist.artifacts.bundle import read_manifest
    from d2persist.predict.onnx_predictor import OnnxPredictor

    image = _make("large", val_image, tmp_path)
    good = load_predictor(str(rgb_run), backend="onnxruntime")
    manifest = read_manifest(str(rgb_run / "export"))
    unresized = OnnxPredictor(good.session, dict(manifest["input"], min_size_test=0),
                              good.metadata)
    with pytest.raises(AssertionError):
        assert_onnx_matches(unresized(image), evaluation_path(rgb_run, image))


def test_onnx_array_input_honours_channel_order(bgr_run, val_image):
    predictor = load_predictor(str(bgr_run), backend="onnxruntime")
    from_file = predictor(val_image)
    rgb = np.asarray(Image.open(val_image).convert("RGB"))
    from_array = predictor(rgb, channel_order="RGB")
    np.testing.assert_array_equal(from_array.boxes, from_file.boxes)
    with pytest.raises(InputImageError, match="channel_order"):
        predictor(rgb)


def test_onnxruntime_backend_needs_neither_torch_nor_detectron2(bgr_run, val_image, tmp_path):
    import subprocess
    import sys

    from helpers import REPO

    image = _make("exif", val_image, tmp_path)
    args = ["--image", image, "--artifacts", str(bgr_run), "--confidence-threshold", "0"]
    res = subprocess.run(  # no --backend: auto is the default, ONNX Runtime here
        [sys.executable, "-c", WITHOUT_TORCH, INFER_SINGLE, *args,
         "--json", str(tmp_path / "ort.json"), "--output", str(tmp_path / "ort.png")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    refused = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, INFER_SINGLE, *args, "--backend", "pytorch",
         "--json", str(tmp_path / "refused.json")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().count("\n") == 0, refused.stderr  # one sentence
    assert "pytorch backend needs torch, torchvision, detectron2" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "refused.json").exists()
    ref = run_tool(INFER_SINGLE, *args, "--json", tmp_path / "torch.json")
    assert ref.returncode == 0, ref.stderr[-2000:]
    got, want = (json.loads((tmp_path / n).read_text()) for n in ("ort.json", "torch.json"))
    assert (got["height"], got["width"]) == (want["height"], want["width"]) == (96, 128)
    assert len(got["instances"]) == len(want["instances"]) > 0
    for a, b in zip(got["instances"], want["instances"]):
        assert a["category_name"] == b["category_name"]
        assert abs(a["score"] - b["score"]) <= 1e-3
        np.testing.assert_allclose(a["bbox"], b["bbox"], rtol=0, atol=0.05)
    assert Image.open(tmp_path / "ort.png").size == (512, 384)  # drawn upscaled to 512 px
