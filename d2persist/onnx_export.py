"""
ONNX export of a detectron2 model, and the contract a caller of the graph must follow.

The graph is traced through detectron2's ``TracingAdapter`` with ``torch.onnx.export(...,
dynamo=False)`` (the default dynamo exporter stops on a data-dependent guard), opset
:data:`ONNX_OPSET` (ROIAlign with ``aligned=True`` needs 16 or later), with dynamic height and
width. It holds the model's normalization, padding, backbone, proposals and heads; it ends
before detectron2's post-processing, whose steps the manifest names and
:mod:`d2persist.onnx_predictor` performs.
"""

import copy
import logging
import warnings
from typing import Dict

import numpy as np
import torch

from .errors import ExportError
from .fileio import atomic_path

__all__ = ["ONNX_OPSET", "check_exportable", "export_onnx"]

logger = logging.getLogger(__name__)

#: The ONNX opset the graph is exported with.
ONNX_OPSET = 17

_OUTPUT_NAMES = {"pred_boxes": "boxes", "pred_classes": "classes", "pred_masks": "masks",
                 "scores": "scores"}

#: What the caller does before the graph (documented in the manifest).
PREPROCESS = [
    "read the image as detectron2's read_image does: EXIF orientation applied, converted to "
    "input.format (gray expanded, alpha dropped)",
    "resize with ResizeShortestEdge(input.min_size_test, input.max_size_test): new size "
    "int(x + 0.5) of the scaled sides, PIL bilinear on uint8",
    "pass it as 'image': uint8, channels x height x width; the graph normalizes and pads",
]
#: What the caller does after the graph (documented in the manifest).
POSTPROCESS = [
    "boxes are XYXY in the resized image, whose height and width are 'image_size': scale x by "
    "original width / resized width and y by original height / resized height, clip to the "
    "original image, drop boxes of zero width or height",
    "masks (if present) are one M x M probability map per detection: paste each into its box "
    "in the original image (bilinear, align_corners=False, zero outside) and keep >= 0.5",
    "the graph already applied the score threshold and per-image detection limit of the config",
]


def check_exportable(model: torch.nn.Module) -> None:
    """
    Raises:
        ExportError: one sentence naming why ``model`` has no ONNX export: only
            ``GeneralizedRCNN`` models predicting boxes (and masks) are exported; keypoints,
            RetinaNet, semantic and panoptic segmentation are not.
    """
    from detectron2.modeling import GeneralizedRCNN

    name = type(model).__name__
    if not isinstance(model, GeneralizedRCNN):
        raise ExportError(
            f"ONNX export supports GeneralizedRCNN models (boxes and masks), not {name}."
        )
    if getattr(model.roi_heads, "keypoint_on", False):
        raise ExportError(
            f"ONNX export supports GeneralizedRCNN models with boxes and masks; this {name} "
            "predicts keypoints, whose post-processing the ONNX predictor does not implement."
        )
    if model.proposal_generator is None:
        raise ExportError(f"ONNX export needs a proposal generator; this {name} reads proposals "
                          "from files.")


def _sample_image(contract):
    """A deterministic noise image of a typical test-time size, in the model's layout."""
    short = int(contract.get("min_size_test") or 800)
    long_side = min(int(short * 4 / 3), int(contract.get("max_size_test") or 1333))
    channels = 1 if contract.get("format") == "L" else 3
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (channels, short, long_side), dtype=np.uint8))


def _inference(model, inputs):
    # do_postprocess=False: the graph returns boxes in the resized image and M x M masks
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


def export_onnx(model: torch.nn.Module, path: str, contract: dict) -> Dict:
    """
    Export ``model`` to ONNX at ``path`` (atomically).

    Args:
        model (nn.Module): a detectron2 model (not DDP-wrapped); a copy is exported, the
            model itself is left as it is.
        path (str): the ``.onnx`` file.
        contract (dict): the run's input contract (``RunConfig.input_contract()``).

    Returns:
        dict: the manifest's ``onnx`` entry: opset, input and output names and shapes, and what
        the caller must do before and after the graph.

    Raises:
        ExportError: the model is not supported, or the exporter failed (the reason in one
            sentence).
    """
    from detectron2.export import TracingAdapter

    check_exportable(model)
    others = contract.get("other_test_augmentations")
    if others:
        raise ExportError(
            f"The ONNX predictor applies only ResizeShortestEdge at test time; this config also "
            f"has {', '.join(others)}."
        )
    model = copy.deepcopy(model).to("cpu").eval()  # the trainer's model stays where it is
    image = _sample_image(contract)
    adapter = TracingAdapter(model, [{"image": image}], _inference).eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about data-dependent asserts
            adapter(image)  # records the output schema
            keys = adapter.outputs_schema.schemas[0].schemas[0].keys
            outputs = [_OUTPUT_NAMES.get(k, k) for k in keys] + ["image_size"]
            dynamic = {"image": {1: "height", 2: "width"}}
            dynamic.update({name: {0: "detections"} for name in outputs[:-1]})
            with atomic_path(path) as tmp:
                torch.onnx.export(
                    adapter, (image,), tmp, opset_version=ONNX_OPSET, dynamo=False,
                    input_names=["image"], output_names=outputs, dynamic_axes=dynamic,
                )
    except Exception as e:  # the exporter raises many kinds; the run must not die of it
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(
            f"torch.onnx.export failed for {type(model).__name__} ({type(e).__name__}: {first})."
        ) from e
    return {
        "opset": ONNX_OPSET,
        "exporter": f"torch {torch.__version__} torch.onnx.export(dynamo=False) through "
                    "detectron2's TracingAdapter",
        "inputs": [{"name": "image", "dtype": "uint8",
                    "shape": [int(image.shape[0]), "height", "width"]}],
        "outputs": [{"name": n, "shape": ["detections", 4] if n == "boxes"
                     else ["detections", 1, "M", "M"] if n == "masks"
                     else [2] if n == "image_size" else ["detections"]} for n in outputs],
        "preprocess": PREPROCESS,
        "postprocess": POSTPROCESS,
    }
