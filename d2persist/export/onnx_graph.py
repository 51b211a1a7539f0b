"""
ONNX export of a detectron2 model, and the contract a caller of the graph must follow.

The graph is traced with ``torch.onnx.export(..., dynamo=False)`` (the default dynamo exporter
stops on a data-dependent guard), opset :data:`ONNX_OPSET` (ROIAlign with ``aligned=True`` needs
16 or later), with dynamic height and width. It holds the model's normalization, padding,
backbone, proposals and heads; it ends before detectron2's post-processing, whose steps the
manifest names and :mod:`d2persist.predict.onnx_predictor` performs in numpy.

Every meta-architecture of detectron2's model zoo is exported, each as a *task* (the manifest's
``onnx.task``) that names the graph's outputs:

=============  ===================================  ==========================================
task           models                               graph outputs (besides ``image_size``)
=============  ===================================  ==========================================
``rcnn``       GeneralizedRCNN (FPN, C4, Cascade,   ``boxes scores classes`` [``masks``]
               masks, keypoints)                    [``keypoint_heatmaps``]
``dense``      DenseDetector (RetinaNet, FCOS)      ``boxes scores classes``
``semantic``   SemanticSegmentor (semantic FPN)     ``sem_seg`` (C x h x w logits, unpadded)
``panoptic``   PanopticFPN                          ``rcnn``'s and ``sem_seg``
``rpn``        ProposalNetwork                      ``proposals objectness_logits``
=============  ===================================  ==========================================

A model of a project's own class is exported as the first of these classes it derives from,
unless it overrides how that class predicts (refused: the graph is detectron2's own inference).
"""

import copy
import logging
import warnings
from typing import Dict

import numpy as np
import torch

from ..errors import ExportError
from ..files.atomic import atomic_path

__all__ = ["ONNX_OPSET", "TASKS", "check_exportable", "export_onnx", "onnx_task"]

logger = logging.getLogger(__name__)

#: The ONNX opset the graph is exported with.
ONNX_OPSET = 17

#: The tasks, by detectron2 meta-architecture class name.
TASKS = {"PanopticFPN": "panoptic", "GeneralizedRCNN": "rcnn", "DenseDetector": "dense",
         "SemanticSegmentor": "semantic", "ProposalNetwork": "rpn"}

#: What the caller does before the graph (documented in the manifest).
PREPROCESS = [
    "read the image as detectron2's read_image does: EXIF orientation applied, converted to "
    "input.format (gray expanded, alpha dropped)",
    "resize with ResizeShortestEdge(input.min_size_test, input.max_size_test): new size "
    "int(x + 0.5) of the scaled sides, PIL bilinear on uint8",
    "pass it as 'image': uint8, channels x height x width; the graph normalizes and pads",
]
#: What the caller does after the graph (documented in the manifest).
_BOXES = ("boxes are XYXY in the resized image, whose height and width are 'image_size': scale "
          "x by original width / resized width and y by original height / resized height, clip "
          "to the original image, drop boxes of zero width or height")
_MASKS = ("masks (if present) are one M x M probability map per detection: paste each into its "
          "box in the original image (bilinear, align_corners=False, zero outside) and keep >= 0.5")
_KEYPOINTS = ("keypoint_heatmaps (if present) are K x S x S logits per detection: as detectron2's "
              "heatmaps_to_keypoints, resize each to its (resized-image) box's ceil(width) x "
              "ceil(height) (bicubic, align_corners=False), take each keypoint's arg-max pixel, "
              "x = box x0 + (column + 0.5) * width / ceil(width) (y alike), its score the softmax "
              "of the full-size map at it normalized by the S x S map's sum; then scale x and y "
              "as the boxes")
_SEM_SEG = ("sem_seg is C x h x w class logits of the resized image: resize to the original size "
            "(bilinear, align_corners=False) and take the arg-max class of each pixel")
_THRESHOLDS = "the graph already applied the score threshold and per-image detection limit"
#: What the caller does after the graph, per task (documented in the manifest).
POSTPROCESS = {
    "rcnn": [_BOXES, _MASKS, _KEYPOINTS, _THRESHOLDS],
    "dense": [_BOXES, _THRESHOLDS],
    "semantic": [_SEM_SEG],
    "panoptic": [_BOXES, _MASKS, _SEM_SEG, _THRESHOLDS,
                 "combine as detectron2's combine_semantic_and_instance_outputs, with the "
                 "manifest's onnx.combine thresholds: instances by descending score (down to "
                 "instances_score_thresh) each take their unclaimed pixels unless more than "
                 "overlap_thresh of their mask is claimed; then each semantic class but 0 "
                 "(things) takes its unclaimed pixels if they number stuff_area_thresh or more"],
    "rpn": ["proposals are XYXY in the resized image: scale, clip and drop empty ones as boxes "
            "are; objectness_logits are their scores (logits)"],
}


def onnx_task(model: torch.nn.Module) -> str:
    """
    The task (:data:`TASKS`) of a detectron2 model.

    Raises:
        ExportError: a model that derives from none of :data:`TASKS`' classes, or a project's
            subclass that overrides how the class predicts (``forward``, ``inference``): the
            graph is detectron2's own inference, which would silently differ from it.
    """
    for cls in type(model).__mro__:
        if cls.__module__.startswith("detectron2.") and cls.__name__ in TASKS:
            break
        own = sorted({"forward", "inference", "forward_inference"} & set(vars(cls)))
        if own and not cls.__module__.startswith("detectron2."):
            base = next((c.__name__ for c in type(model).__mro__
                         if c.__module__.startswith("detectron2.") and c.__name__ in TASKS), None)
            if base is not None:
                raise ExportError(
                    f"ONNX export traces {base}'s own inference; {cls.__name__} overrides "
                    f"{' and '.join(own)}, which the graph would leave out.")
    else:
        raise ExportError(
            f"ONNX export supports detectron2's {', '.join(TASKS)} models, not "
            f"{type(model).__name__}."
        )
    return TASKS[cls.__name__]


def check_exportable(model: torch.nn.Module) -> str:
    """
    Check, before any tracing, that ``model`` has an ONNX export.

    Returns:
        str: its task (:data:`TASKS`).

    Raises:
        ExportError: one sentence naming the part that has no export: another
            meta-architecture, deformable convolution (ONNX Runtime has no kernel for it),
            rotated boxes, proposals read from files.
    """
    from detectron2.layers import DeformConv, ModulatedDeformConv
    from detectron2.modeling.proposal_generator.rrpn import RRPN
    from detectron2.modeling.roi_heads.rotated_fast_rcnn import RROIHeads

    task = onnx_task(model)
    name = type(model).__name__
    for module_name, module in model.named_modules():
        if isinstance(module, (DeformConv, ModulatedDeformConv)):
            raise ExportError(
                f"ONNX export cannot express {type(module).__name__} ({module_name} of this "
                f"{name}): ONNX Runtime has no deformable convolution kernel."
            )
    if task in ("rcnn", "panoptic"):
        if model.proposal_generator is None:
            raise ExportError(f"ONNX export needs a proposal generator; this {name} reads "
                              "proposals from files.")
        if isinstance(model.proposal_generator, RRPN) or isinstance(model.roi_heads, RROIHeads):
            raise ExportError(f"ONNX export supports axis-aligned boxes; this {name} predicts "
                              "rotated boxes.")
    if task == "rpn" and isinstance(model.proposal_generator, RRPN):
        raise ExportError(f"ONNX export supports axis-aligned boxes; this {name} proposes "
                          "rotated boxes.")
    return task


def _sample_image(contract):
    """A deterministic noise image of a typical test-time size, in the model's layout."""
    short = int(contract.get("min_size_test") or 800)
    long_side = min(int(short * 4 / 3), int(contract.get("max_size_test") or 1333))
    channels = 1 if contract.get("format") == "L" else 3
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (channels, short, long_side), dtype=np.uint8))


def _images(model, image):
    """detectron2's normalization and padding (``preprocess_image``) of one CHW image."""
    from detectron2.structures import ImageList

    if hasattr(model, "preprocess_image"):
        return model.preprocess_image([{"image": image}])
    x = (image.to(model.pixel_mean.device) - model.pixel_mean) / model.pixel_std
    return ImageList.from_tensors([x], model.backbone.size_divisibility,
                                  padding_constraints=model.backbone.padding_constraints)


def _unpadded(logits, image):
    """The logits (1 x C x H x W, padded) of the image itself: C x h x w."""
    return logits[0, :, : image.shape[-2], : image.shape[-1]]


def _instances_outputs(model, images, features):
    """boxes, scores, classes[, masks][, keypoint_heatmaps] of a GeneralizedRCNN's heads."""
    heads = model.roi_heads
    proposals, _ = model.proposal_generator(images, features, None)
    keypoints = bool(getattr(heads, "keypoint_on", False))
    heads.keypoint_on = False  # the heatmaps end the graph, not heatmaps_to_keypoints
    try:
        results, _ = heads(images, features, proposals, None)
    finally:
        if keypoints:
            heads.keypoint_on = True
    r = results[0]
    out = {"boxes": r.pred_boxes.tensor, "scores": r.scores, "classes": r.pred_classes}
    if r.has("pred_masks"):
        out["masks"] = r.pred_masks
    if keypoints:
        feats = [features[f] for f in heads.keypoint_in_features]
        if heads.keypoint_pooler is not None:
            feats = heads.keypoint_pooler(feats, [r.pred_boxes])
        else:  # a head on the pooled box features of its own
            feats = {f: features[f] for f in heads.keypoint_in_features}
        out["keypoint_heatmaps"] = heads.keypoint_head.layers(feats)
    return out


class _Graph(torch.nn.Module):
    """The traced function of a task: a uint8 CHW image in, a tuple of named tensors out."""

    def __init__(self, model, task):
        super().__init__()
        self.model, self.task = model, task
        self.names = []

    def forward(self, image):
        from detectron2.export.torchscript_patch import patch_builtin_len

        with patch_builtin_len():  # len(Instances) traced as a size, as TracingAdapter does
            return self._forward(image)

    def _forward(self, image):
        m, task = self.model, self.task
        images = _images(m, image)
        features = m.backbone(images.tensor)
        if task == "rcnn":
            out = _instances_outputs(m, images, features)
        elif task == "dense":
            feats = [features[f] for f in m.head_in_features]
            r = m.forward_inference(images, feats, m.head(feats))[0]
            out = {"boxes": r.pred_boxes.tensor, "scores": r.scores, "classes": r.pred_classes}
        elif task == "semantic":
            out = {"sem_seg": _unpadded(m.sem_seg_head(features, None)[0], image)}
        elif task == "panoptic":
            sem_seg = _unpadded(m.sem_seg_head(features, None)[0], image)
            out = dict(_instances_outputs(m, images, features), sem_seg=sem_seg)
        else:  # rpn
            proposals, _ = m.proposal_generator(images, features, None)
            out = {"proposals": proposals[0].proposal_boxes.tensor,
                   "objectness_logits": proposals[0].objectness_logits}
        out["image_size"] = torch._shape_as_tensor(image)[1:]
        self.names = list(out)
        return tuple(out.values())


_SHAPES = {"boxes": ["detections", 4], "proposals": ["detections", 4],
           "masks": ["detections", 1, "M", "M"], "keypoint_heatmaps": ["detections", "K", "S", "S"],
           "sem_seg": ["classes", "height", "width"], "image_size": [2]}


def _combine(model):
    return {"overlap_thresh": float(model.combine_overlap_thresh),
            "stuff_area_thresh": float(model.combine_stuff_area_thresh),
            "instances_score_thresh": float(model.combine_instances_score_thresh)}


def export_onnx(model: torch.nn.Module, path: str, contract: dict) -> Dict:
    """
    Export ``model`` to ONNX at ``path`` (atomically).

    Args:
        model (nn.Module): a detectron2 model (not DDP-wrapped); a copy is exported, the
            model itself is left as it is.
        path (str): the ``.onnx`` file.
        contract (dict): the run's input contract (``RunConfig.input_contract()``).

    Returns:
        dict: the manifest's ``onnx`` entry: task, opset, input and output names and shapes,
        and what the caller must do before and after the graph.

    Raises:
        ExportError: the model is not supported, or the exporter failed (the reason in one
            sentence).
    """
    task = check_exportable(model)
    others = contract.get("other_test_augmentations")
    if others:
        raise ExportError(
            f"The ONNX predictor applies only a ResizeShortestEdge of one size, bilinear, at "
            f"test time; this config has {', '.join(others)}."
        )
    model = copy.deepcopy(model).to("cpu").eval()  # the trainer's model stays where it is
    image = _sample_image(contract)
    graph = _Graph(model, task).eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about data-dependent asserts
            graph(image)  # records the output names
            outputs = list(graph.names)
            dynamic = {"image": {1: "height", 2: "width"}}
            dynamic.update({n: {1: "height", 2: "width"} if n == "sem_seg" else
                            {0: "detections"} for n in outputs if n != "image_size"})
            with atomic_path(path) as tmp:
                torch.onnx.export(
                    graph, (image,), tmp, opset_version=ONNX_OPSET, dynamo=False,
                    input_names=["image"], output_names=outputs, dynamic_axes=dynamic,
                )
    except Exception as e:  # the exporter raises many kinds; the run must not die of it
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(
            f"torch.onnx.export failed for {type(model).__name__} ({type(e).__name__}: {first})."
        ) from e
    entry = {
        "task": task,
        "opset": ONNX_OPSET,
        "exporter": f"torch {torch.__version__} torch.onnx.export(dynamo=False)",
        "inputs": [{"name": "image", "dtype": "uint8",
                    "shape": [int(image.shape[0]), "height", "width"]}],
        "outputs": [{"name": n, "shape": _SHAPES.get(n, ["detections"])} for n in outputs],
        "preprocess": PREPROCESS,
        "postprocess": POSTPROCESS[task],
    }
    if task == "panoptic":
        entry["combine"] = _combine(model)
    return entry
