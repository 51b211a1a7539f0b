"""
The model families of detectron2's LazyConfig model zoo (``configs/COCO-*/*.py``,
``configs/new_baselines``): each zoo model, made tiny, in place of the built-in shapes LazyConfig's
model, trains through tools/lazyconfig_train_net.py's loop, exports ONNX, and both backends
predict as the config's own evaluation path does.
"""

import functools
import os

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog
from helpers import REPO, run_tool
from test_families import assert_same, predictor
from test_predictor import _make

from d2persist import train_lazy
from d2persist.data.shapes import SHAPE_KEYPOINTS, register_shapes
from d2persist.predict.predictor import arrays_of

LAZY_TRAIN_NET = os.path.join(REPO, "tools", "lazyconfig_train_net.py")
BUILT_IN = os.path.join(REPO, "configs", "shapes_mask_rcnn_R_18_FPN_lazy.py")

#: family -> (the zoo LazyConfig whose model is taken, dataset task suffix, ONNX task)
FAMILIES = {
    "keypoint": ("COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.py", "_kp", "rcnn"),
    "panoptic": ("COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.py", "_panoptic", "panoptic"),
    "fcos": ("COCO-Detection/fcos_R_50_FPN_1x.py", "", "dense"),
    "new_baselines": ("new_baselines/mask_rcnn_R_50_FPN_50ep_LSJ.py", "", "rcnn"),
}

#: What a user writes to train a zoo model on the shapes data: the built-in LazyConfig with the
#: zoo's model, made tiny (ResNet-18 with BatchNorm from scratch, 3 classes, 4 keypoints).
CONFIG = '''
import os

import detectron2
from detectron2.config import LazyConfig
from detectron2.layers import ShapeSpec

_BUILT_IN = LazyConfig.load({built_in!r})
_ZOO = LazyConfig.load(os.path.join(os.path.dirname(detectron2.__file__), "model_zoo",
                                    "configs", {zoo!r}))
dataloader, optimizer, train, lr_multiplier = (
    _BUILT_IN.dataloader, _BUILT_IN.optimizer, _BUILT_IN.train, _BUILT_IN.lr_multiplier)
model = _ZOO.model


def _batch_norm(node):
    # new_baselines' heads take a lambda as conv_norm, which no YAML can hold (d2persist refuses
    # such a config in one sentence): a norm's name does the same and rebuilds safely
    for key, value in list(node.items()):
        if key in ("norm", "conv_norm") and (callable(value) or value in ("FrozenBN", "SyncBN")):
            node[key] = "BN"
        elif hasattr(value, "items"):
            _batch_norm(value)


_batch_norm(model)
_bottom_up = model.backbone.bottom_up  # "_": not a config entry of its own
_bottom_up.stages.depth = 18
_bottom_up.stages.pop("stride_in_1x1", None)  # basic blocks have no 1x1 conv
_bottom_up.freeze_at = 0
_top = model.backbone.get("top_block") or {{}}
if "in_channels" in _top and _top.get("in_feature", "res5") == "res5":
    _top.in_channels = 512  # ResNet-18's res5
if "roi_heads" in model:
    model.roi_heads.num_classes = 3
    model.roi_heads.box_predictor.test_score_thresh = 0.0
    # the heads' sizes of the built-in tiny config: 32 sampled ROIs, 32-channel convs, FC 64
    model.roi_heads.batch_size_per_image = 32
    model.roi_heads.box_head.conv_dims = [32] * len(model.roi_heads.box_head.conv_dims)
    model.roi_heads.box_head.fc_dims = [64] * len(model.roi_heads.box_head.fc_dims)
    model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=64)
    if "mask_head" in model.roi_heads:
        model.roi_heads.mask_head.conv_dims = [32] * len(model.roi_heads.mask_head.conv_dims)
    if "keypoint_head" in model.roi_heads:
        model.roi_heads.keypoint_head.num_keypoints = {keypoints}
        model.roi_heads.keypoint_head.conv_dims = [32, 32]
        dataloader.train.mapper.use_keypoint = True
        dataloader.train.mapper.keypoint_hflip_indices = [0, 3, 2, 1]  # left <-> right
else:
    model.num_classes = 3
    model.test_score_thresh = 0.0
if model.get("proposal_generator") is not None:
    model.proposal_generator.post_nms_topk = (64, 64)
if "sem_seg_head" in model:
    model.sem_seg_head.num_classes = 2  # things, background
    model.sem_seg_head.conv_dims = 32
dataloader.train.dataset.names = "shapes{suffix}_train"
dataloader.test.dataset.names = "shapes{suffix}_val"
dataloader.pop("evaluator")  # no in-training evaluation here
train.persist = dict(export_formats=["safetensors", "onnx"])
'''

TINY = [
    "train.max_iter=4", "train.checkpointer.period=2",
    "dataloader.train.mapper.augmentations.0.short_edge_length=[64]",
    "dataloader.train.mapper.augmentations.0.max_size=96",
    "dataloader.test.mapper.augmentations.0.short_edge_length=64",
    "dataloader.test.mapper.augmentations.0.max_size=96",
    "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
    "lr_multiplier.scheduler.milestones=[2,3]", "train.seed=7", "optimizer.lr=0.002",
]


def config_file(name, folder):
    zoo, suffix, _ = FAMILIES[name]
    path = folder / f"{name}_lazy.py"
    path.write_text(CONFIG.format(built_in=BUILT_IN, zoo=zoo, suffix=suffix,
                                  keypoints=len(SHAPE_KEYPOINTS)))
    return path


_RUNS = {}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """``(name, run folder)``: the keypoint family through the tool, the others in-process."""
    name = request.param
    if name not in _RUNS:
        folder = tmp_path_factory.mktemp(f"lazy_{name}")
        path, out = config_file(name, folder), folder / "run"
        if name == "keypoint":
            res = run_tool(LAZY_TRAIN_NET, "--config-file", path, *TINY,
                           f"train.output_dir={out}", timeout=600)
            assert res.returncode == 0, res.stderr[-3000:]
        else:
            register_shapes()
            cfg = LazyConfig.apply_overrides(LazyConfig.load(str(path)),
                                             TINY + [f"train.output_dir={out}"])
            train_lazy(cfg)
        _RUNS[name] = out
    return name, _RUNS[name]


@functools.lru_cache(maxsize=None)
def _evaluation_model(run):
    cfg = LazyConfig.load(str(run / "config.yaml"))
    model = instantiate(cfg.model)
    DetectionCheckpointer(model).load(str(run / "model_final.pth"))
    return model.eval(), instantiate(cfg.dataloader.test.mapper)


def evaluation_path(run, image):
    """The config's own evaluation path: its model and its test mapper, stock detectron2."""
    from detectron2.data.detection_utils import read_image

    model, mapper = _evaluation_model(run)
    h, w = read_image(image).shape[:2]
    with torch.no_grad():
        out = model([mapper({"file_name": image, "height": h, "width": w})])[0]
    return arrays_of(out, h, w)


@pytest.mark.parametrize("kind", ["plain", "large"])
def test_lazy_zoo_family_exports_and_predicts_as_it_evaluates(family, tmp_path, kind):
    import json

    name, run = family
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    assert manifest["config_kind"] == "lazy"
    assert manifest["onnx"].get("task") == FAMILIES[name][2], manifest["onnx"]
    outputs = {"keypoint": ["boxes", "keypoints"], "fcos": ["boxes"],
               "new_baselines": ["boxes", "masks"],
               "panoptic": ["boxes", "masks", "sem_seg", "panoptic_seg"]}
    assert manifest["input"]["outputs"] == outputs[name]  # as a yacs run's says
    register_shapes()
    image = _make(kind, DatasetCatalog.get("shapes_val")[3]["file_name"], tmp_path)
    ref = evaluation_path(run, image)
    assert ref.boxes is None or len(ref.boxes) > 0
    pytorch = predictor(run)(image).arrays
    assert_same(ref, pytorch, exact=True)
    assert_same(ref, predictor(run, "onnxruntime")(image).arrays, exact=False)
    if name == "keypoint":
        assert pytorch.keypoints.shape[1:] == (len(SHAPE_KEYPOINTS), 3)
    if name == "panoptic":
        assert pytorch.panoptic is not None and np.isin(pytorch.sem_seg, [0, 1]).all()
