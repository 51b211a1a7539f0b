"""
detectron2's documented entry points in the environment ``make`` builds: a model-zoo config
(R-50 FPN Mask R-CNN, by ``model_zoo.get_config_file``) trains a few iterations from scratch
through ``tools/train_net.py``, exports ONNX, and both backends predict.
"""

import json

from helpers import INFER_SINGLE, TINY_OPTS, TRAIN_NET, run_tool


def test_model_zoo_config_trains_exports_onnx_and_both_backends_predict(tmp_path):
    from detectron2 import model_zoo  # imports pkg_resources: setup.py keeps setuptools < 81

    from d2persist.data.shapes import SHAPE_CLASSES, register_shapes

    path = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    out = tmp_path / "run"
    res = run_tool(TRAIN_NET, "--config-file", path, *TINY_OPTS, "MODEL.WEIGHTS", "",
                   "DATASETS.TRAIN", "('shapes_train',)", "MODEL.ROI_HEADS.NUM_CLASSES",
                   len(SHAPE_CLASSES), "SOLVER.MAX_ITER", 2, "MODEL.DEVICE", "cpu",
                   "PERSIST.EXPORT_FORMATS", "['safetensors', 'onnx']", "OUTPUT_DIR", out,
                   timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert "model.onnx" in manifest["files"] and "error" not in manifest.get("onnx", {})
    from detectron2.data import DatasetCatalog

    image = DatasetCatalog.get(register_shapes()[1])[0]["file_name"]
    found = {}
    for backend in ("pytorch", "onnxruntime"):
        pred = tmp_path / f"{backend}.json"
        res = run_tool(INFER_SINGLE, "--image", image, "--artifacts", out, "--backend", backend,
                       "--output", tmp_path / f"{backend}.png", "--json", pred, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        found[backend] = [i["category_id"] for i in json.loads(pred.read_text())["instances"]]
    assert found["pytorch"] == found["onnxruntime"]
