"""
The bundle's INT8 model: ONNX Runtime static quantization of ``model.onnx`` into
``model.int8.onnx``, calibrated on training images read and resized as evaluation does.

Every convolution and fully connected layer is quantized (QDQ format, weights per channel in
int8, activations in uint8); every other operator stays in float (ROIAlign, NMS, the box
arithmetic and the graph's shape computations). Chosen by measurement on the built-in model
(``bench/bench_int8.py``, bench/README.rst): keeping the stem or the prediction layers (RPN
objectness and deltas, box classifier and regressor, mask predictor) in float cost as much AP
or more, and time. :data:`FLOAT_LAYERS` is the override point for a model that needs some.

That recipe was chosen on one model; another may lose more than its budget. The export's
self-evaluation then keeps the layers :func:`sensitivity_ranking` measures as the most sensitive
in float (``quantize_onnx(float_nodes=...)``) until INT8 is within it (see
:func:`d2persist.export.self_eval.evaluate_bundle`).
"""

import logging
import os
import tempfile
import time
from typing import List, Sequence, Tuple

import numpy as np

from ..errors import ExportError
from ..files.atomic import atomic_path
from ..predict.images import image_input, resize_shortest_edge

__all__ = ["quantize_onnx", "FLOAT_LAYERS", "calibration_subset", "sensitivity_ranking"]

logger = logging.getLogger(__name__)

#: Name parts of the Conv/Gemm nodes kept in float (none: see above).
FLOAT_LAYERS: Tuple[str, ...] = ()
#: The operators quantized.
QUANTIZED_OPS = ("Conv", "Gemm")


def calibration_subset(paths: Sequence[str], count: int) -> list:
    """``count`` of ``paths`` spread evenly over them (all if there are fewer), in order."""
    paths = list(paths)
    if count <= 0 or not paths:
        return []
    if count >= len(paths):
        return paths
    return [paths[int(i)] for i in np.linspace(0, len(paths) - 1, count).round()]


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over image files, as evaluation reads."""

    def __init__(self, paths, contract):
        self._paths = iter(paths)
        self._format = contract["format"]
        self._sizes = int(contract.get("min_size_test") or 0), int(contract.get("max_size_test")
                                                                   or 0)

    def get_next(self):
        path = next(self._paths, None)
        if path is None:
            return None
        image = resize_shortest_edge(image_input(path, None, self._format), *self._sizes)
        return {"image": np.ascontiguousarray(image.transpose(2, 0, 1))}


def quantize_onnx(float_path: str, int8_path: str, images: Sequence[str], contract: dict,
                  float_nodes: Sequence[str] = ()) -> dict:
    """
    Quantize the ONNX model ``float_path`` into ``int8_path`` (written atomically).

    Args:
        images: calibration image files (training images).
        contract (dict): the manifest's ``input``: format and test-time sizes.
        float_nodes: names of Conv/Gemm nodes to leave in float (besides :data:`FLOAT_LAYERS`).

    Returns:
        dict: the manifest's ``onnx_int8`` entry (without ``file``).

    Raises:
        ExportError: no calibration images, or ONNX Runtime cannot quantize the model.
    """
    try:
        import onnx
        import onnxruntime as ort
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:
        raise ExportError(f"INT8 export needs onnx and onnxruntime ({e}).") from None
    images = list(images)
    if not images:
        raise ExportError("INT8 export needs calibration images, and the training dataset "
                          "gave none.")
    start = time.perf_counter()
    model = onnx.load(float_path, load_external_data=False)
    kept = sorted(n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS and (
        any(k in n.name for k in FLOAT_LAYERS) or n.name in set(float_nodes)))
    quantized = sum(n.op_type in QUANTIZED_OPS for n in model.graph.node) - len(kept)
    folder = os.path.dirname(os.path.abspath(int8_path))
    try:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".d2persist-tmp-quant-") as tmp:
            pre = os.path.join(tmp, "pre.onnx")
            quant_pre_process(float_path, pre, skip_symbolic_shape=True)
            with atomic_path(int8_path) as out:
                quantize_static(
                    pre, out, _Reader(images, contract), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_exclude=kept,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                )
    except ExportError:
        raise
    except Exception as e:  # ONNX Runtime's quantizer raises many kinds
        raise ExportError(f"ONNX Runtime could not quantize {float_path} "
                          f"({type(e).__name__}: {e}).") from None
    logger.info("Quantized %s to INT8 in %.1f s (%d calibration images).", float_path,
                time.perf_counter() - start, len(images))
    return {
        "quantizer": f"onnxruntime {ort.__version__} quantize_static, QDQ, per-channel int8 "
                     "weights, uint8 activations, MinMax calibration",
        "calibration_images": len(images),
        "quantized_ops": list(QUANTIZED_OPS),
        "quantized_nodes": quantized,
        "float_nodes": kept,
    }


class _Images(_Reader):
    """The calibration reader as the iterable ONNX Runtime's quantization debugger reads."""

    def __iter__(self):
        return iter(self.get_next, None)


def sensitivity_ranking(float_path: str, int8_path: str, images: Sequence[str],
                        contract: dict) -> List[Tuple[str, float]]:
    """
    The quantized Conv/Gemm nodes of ``int8_path``, the most sensitive first, as measured on
    ``images``: each node's signal-to-quantization-noise ratio (dB), the lower of its input
    activation's (before vs after its QuantizeLinear/DequantizeLinear pair, in the INT8 model's
    own run, ONNX Runtime's ``qdq_loss_debug``) and its weights' (float vs dequantized).

    Returns:
        list[tuple[str, float]]: (node name in ``float_path``, SQNR in dB), ascending SQNR.
    """
    import onnx
    from onnxruntime.quantization import qdq_loss_debug as debug

    folder = os.path.dirname(os.path.abspath(int8_path))
    with tempfile.TemporaryDirectory(dir=folder, prefix=".d2persist-tmp-sens-") as tmp:
        augmented = os.path.join(tmp, "augmented.onnx")
        debug.modify_model_output_intermediate_tensors(int8_path, augmented)
        activations = debug.create_activation_matching(
            debug.collect_activations(augmented, _Images(images, contract)))
    sqnr = debug.compute_signal_to_quantization_noice_ratio
    act = {name: sqnr(m["pre_qdq"], m["post_qdq"]) for name, m in activations.items()}
    weights = {name: sqnr(m["float"], m["dequantized"])
               for name, m in debug.create_weight_matching(float_path, int8_path).items()}
    ranked = []
    for node in onnx.load(float_path, load_external_data=False).graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        measured = [act.get(node.input[0])] + [weights.get(n) for n in node.input[1:2]]
        scores = [float(v) for v in measured if v is not None]
        if scores:  # a node left in float has neither
            ranked.append((node.name, min(scores)))
    return sorted(ranked, key=lambda r: r[1])
