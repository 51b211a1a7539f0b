"""
``export``: the inference bundle, write side. The bundle writer (weights as safetensors, the
config, the manifest), each model family's ONNX graph and its contract, the INT8 model, and the
bundle's self-evaluation through every backend with the run's evaluator. Never imports training
code.
"""

from .bundle import add_int8, add_onnx, write_export
from .onnx_graph import TASKS, check_exportable, export_onnx
from .quantize import quantize_onnx, sensitivity_ranking
from .self_eval import HEADLINE_METRICS, evaluate_bundle, evaluate_saved_bundle, family_evaluator

__all__ = [
    "add_int8",
    "add_onnx",
    "write_export",
    "TASKS",
    "check_exportable",
    "export_onnx",
    "quantize_onnx",
    "sensitivity_ranking",
    "HEADLINE_METRICS",
    "evaluate_bundle",
    "evaluate_saved_bundle",
    "family_evaluator",
]
