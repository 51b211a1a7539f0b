"""ONNX export: refused models, a failing exporter, and adding ONNX to an existing bundle."""

import json
import os
import re

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from helpers import INFER_SINGLE, REPO, run_tool, tiny_cfg, train

from d2persist import ArtifactError, ExportError, load_predictor
from d2persist.data.shapes import register_shapes
from d2persist.export.onnx_graph import export_onnx

EXPORT_MODEL = os.path.join(REPO, "tools", "export_model.py")
ONNX = ["PERSIST.EXPORT_FORMATS", "['safetensors', 'onnx']"]


def _own_model(cfg, name):
    """A project's meta-architecture: none of detectron2's, or one predicting its own way."""
    from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

    if "OwnDetector" not in META_ARCH_REGISTRY:
        @META_ARCH_REGISTRY.register()
        class OwnDetector(torch.nn.Module):
            def __init__(self, cfg):
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 3, 1)

        @META_ARCH_REGISTRY.register()
        class OwnRCNN(GeneralizedRCNN):
            def inference(self, *args, **kwargs):  # e.g. a project's test-time trick
                return super().inference(*args, **kwargs)

    cfg.defrost()
    cfg.MODEL.META_ARCHITECTURE = name
    return build_model(cfg)


@pytest.mark.parametrize("opts,reason", [
    (["MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.RES2_OUT_CHANNELS", 256,
      "MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, False, False, True]],
     r"cannot express DeformConv \(backbone.bottom_up.res5.0.conv2"),
    (["MODEL.PROPOSAL_GENERATOR.NAME", "RRPN", "MODEL.ANCHOR_GENERATOR.NAME",
      "RotatedAnchorGenerator", "MODEL.ANCHOR_GENERATOR.ANGLES", [[0]],
      "MODEL.RPN.BBOX_REG_WEIGHTS", (1, 1, 1, 1, 1), "MODEL.ROI_HEADS.NAME", "RROIHeads",
      "MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlignRotated", "MODEL.MASK_ON", False,
      "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS", (10, 10, 5, 5, 1)], "rotated boxes"),
    ([], "not OwnDetector"),
    ([], "OwnRCNN overrides inference"),
])
def test_unsupported_models_are_refused_in_one_sentence(tmp_path, opts, reason):
    cfg = tiny_cfg(tmp_path, *opts)
    own = reason.split()[0] if "Own" in reason else None
    model = _own_model(cfg, "OwnDetector" if own == "not" else own) if own else build_model(cfg)
    path = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match=reason) as e:
        export_onnx(model, str(path), {"min_size_test": 64, "max_size_test": 96})
    assert "\n" not in str(e.value) and str(e.value).endswith(".")
    assert not path.exists() and os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def val_image():
    _, val = register_shapes()
    return DatasetCatalog.get(val)[1]["file_name"]


def test_failing_exporter_leaves_run_and_bundle_then_export_model_adds_onnx(
    tmp_path, mocker, val_image
):
    mocker.patch("torch.onnx.export", side_effect=RuntimeError("Unsupported: aten::made_up"))
    train(tiny_cfg(tmp_path, *ONNX, "SOLVER.MAX_ITER", 2,
                   "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0))
    mocker.stopall()
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert "aten::made_up" in manifest["onnx"]["error"]
    assert set(manifest["files"]) == {"config.yaml", "model.safetensors"}
    assert not [n for n in os.listdir(tmp_path / "export") if n.startswith(".d2persist-tmp")]
    torch_pred = load_predictor(str(tmp_path))(val_image)  # the safetensors bundle works
    with pytest.raises(ArtifactError, match="export failed: .*aten::made_up.*export_model.py"):
        load_predictor(str(tmp_path), backend="onnxruntime")
    res = run_tool(INFER_SINGLE, "--image", val_image, "--artifacts", tmp_path,
                   "--backend", "onnxruntime")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("infer_single.py: error:")

    from d2persist.files.lock import lock_run_folder, unlock_run_folder

    before = {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()}
    lock_run_folder(str(tmp_path))  # as a resumed training of the run holds it
    try:
        for artifacts in (tmp_path, tmp_path / "export"):
            res = run_tool(EXPORT_MODEL, "--artifacts", artifacts, "--format", "onnx")
            assert res.returncode == 2 and "Traceback" not in res.stderr
            assert re.fullmatch(rf"export_model.py: error: {re.escape(str(tmp_path))} is being "
                                r"written by a training run \(host .*\), which exports into "
                                r".*export too: run export_model.py once it has ended\.",
                                res.stderr.strip().splitlines()[-1]), res.stderr[-2000:]
    finally:
        unlock_run_folder(str(tmp_path))
    assert {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()} == before
    res = run_tool(EXPORT_MODEL, "--artifacts", tmp_path, "--format", "onnx")
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["onnx"]["opset"] >= 16 and "error" not in manifest["onnx"]
    assert manifest["files"]["model.onnx"]["size"] == (tmp_path / "export" / "model.onnx").stat(
    ).st_size
    ort_pred = load_predictor(str(tmp_path), backend="onnxruntime")(val_image)
    assert len(ort_pred) == len(torch_pred.instances) > 0
    np.testing.assert_allclose(ort_pred.boxes, torch_pred.instances.pred_boxes.tensor.numpy(),
                               rtol=0, atol=0.05)


def test_export_model_bad_input_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for name, message in (("missing", "missing does not exist."),
                          ("empty", "empty holds no complete export bundle")):
        res = run_tool(EXPORT_MODEL, "--artifacts", tmp_path / name)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert message in res.stderr.strip().splitlines()[-1]


def test_export_leaves_the_trainers_model_as_it_was(tmp_path):
    model = build_model(tiny_cfg(tmp_path)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, str(tmp_path / "model.onnx"), {"min_size_test": 64, "max_size_test": 96})
    assert model.training  # not switched to eval mode (nor moved) behind the trainer's back
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert (tmp_path / "model.onnx").stat().st_size > 0


def test_tools_say_bad_input_in_one_line(tmp_path):
    from helpers import TRAIN_NET

    res = run_tool(TRAIN_NET, "--config-file", tmp_path / "missing.yaml")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].endswith("missing.yaml does not exist.")
