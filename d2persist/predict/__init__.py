"""
``predict``: prediction from the artifacts, exactly as evaluation predicted. Image reading as
evaluation reads, every family's outputs as JSON and as one drawing, the ONNX Runtime predictor
(numpy only), ``load_predictor`` (the backend choice), prediction on files, and COCO / semantic /
panoptic scoring.

This ``__init__`` re-exports only what needs no torch, so the ONNX Runtime path stays torch-free;
the PyTorch side lives in :mod:`.predictor` (``Predictor``, evaluation-exact) and :mod:`.rebuild`
(a model from a safe-loaded config).
"""

from .images import (
    check_image_bytes,
    check_image_file,
    decode_image,
    encode_png,
    image_input,
    read_image,
    resize_shortest_edge,
)
from .infer import IMAGE_EXTENSIONS, collect_images, predict_files
from .load import load_predictor
from .onnx_predictor import OnnxPrediction, OnnxPredictor
from .outputs import PredictionArrays, draw_prediction, prediction_json

__all__ = [
    "check_image_bytes",
    "check_image_file",
    "decode_image",
    "encode_png",
    "image_input",
    "read_image",
    "resize_shortest_edge",
    "IMAGE_EXTENSIONS",
    "collect_images",
    "predict_files",
    "load_predictor",
    "OnnxPrediction",
    "OnnxPredictor",
    "PredictionArrays",
    "draw_prediction",
    "prediction_json",
]
