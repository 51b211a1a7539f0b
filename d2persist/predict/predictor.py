"""
Prediction from d2persist artifacts, exactly as training-time evaluation does it.

An image file is read with ``detectron2.data.detection_utils.read_image`` in ``INPUT.FORMAT``
(which applies EXIF orientation and converts grayscale/RGBA like the evaluation loader),
resized with the test-time ``ResizeShortestEdge`` built by ``build_augmentation(cfg, False)``,
and fed to the model in eval mode with the original height and width, as
``DatasetMapper(cfg, is_train=False)`` does. Nothing here imports training code.
"""

import logging
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..artifacts.manifest import describe_source
from ..artifacts.resolve import resolve_artifacts
from ..errors import D2PersistError, InputImageError
from ..layout import PYTORCH
from .images import check_image_file, decode_image, image_input, pil_errors
from .outputs import PredictionArrays, class_names_of, draw_prediction, prediction_json
from .rebuild import build_model_from_config, load_weights

if TYPE_CHECKING:
    from detectron2.data.catalog import Metadata
    from detectron2.data.transforms import Augmentation

__all__ = ["Predictor", "Prediction", "arrays_of", "load_torch_predictor", "torch_device",
           "read_image_file", "decode_image_data"]

logger = logging.getLogger(__name__)


def read_image_file(path: str, fmt: str) -> np.ndarray:
    """
    Read an image file exactly as detectron2's evaluation loader does
    (``detection_utils.read_image``), after checking it is a whole image file.

    Returns:
        np.ndarray: HxWxC uint8 in ``fmt``.

    Raises:
        InputImageError: the file is missing, empty, not an image, or truncated.
    """
    from detectron2.data.detection_utils import read_image

    check_image_file(path)
    with pil_errors(f"{path} is not an image file PIL can read.",
                    f"Image {path} is truncated or corrupt", f"image {path}"):
        return read_image(path, format=fmt)


def decode_image_data(data: bytes, fmt: str) -> np.ndarray:
    """
    :func:`read_image_file` of an image file's content: detectron2's EXIF orientation and
    conversion of what PIL decodes from the same bytes (``read_image`` opens the file and does
    the same), without a temp file. Not verified first (see
    :func:`~d2persist.predict.images.check_image_bytes`).

    Args:
        data (bytes): what the image file holds.
        fmt (str): ``INPUT.FORMAT``.

    Returns:
        np.ndarray: HxWxC uint8 in ``fmt``.

    Raises:
        InputImageError: ``data`` is not an image, or truncated.
    """
    from detectron2.data.detection_utils import _apply_exif_orientation, convert_PIL_to_numpy

    return decode_image(data, fmt, convert=lambda image, f: convert_PIL_to_numpy(
        _apply_exif_orientation(image), f))


def arrays_of(outputs: Dict[str, Any], height: int, width: int) -> PredictionArrays:
    """
    The :class:`~d2persist.predict.outputs.PredictionArrays` of a detectron2 model's output
    dict (on any device): ``instances`` (boxes, scores, classes, masks, keypoints), ``sem_seg``
    (arg-maxed as SemSegEvaluator does), ``panoptic_seg``, and an RPN's ``proposals``.
    """
    a = PredictionArrays(int(height), int(width))
    inst = outputs.get("instances")
    if inst is not None:
        inst = inst.to("cpu")
        a.boxes = inst.pred_boxes.tensor.numpy()
        a.scores = inst.scores.numpy()
        a.classes = inst.pred_classes.numpy().astype(np.int64)
        if inst.has("pred_masks"):
            a.masks = inst.pred_masks.numpy().astype(bool)
        if inst.has("pred_keypoints"):
            a.keypoints = inst.pred_keypoints.numpy()
    if "sem_seg" in outputs:
        a.sem_seg = outputs["sem_seg"].argmax(dim=0).to("cpu").numpy().astype(np.int64)
    if "panoptic_seg" in outputs:
        seg, info = outputs["panoptic_seg"]
        a.panoptic = seg.to("cpu").numpy().astype(np.int64)
        a.segments_info = [dict(s) for s in info or []]
    if "proposals" in outputs:
        props = outputs["proposals"].to("cpu")
        a.proposals = props.proposal_boxes.tensor.numpy()
        a.objectness = props.objectness_logits.numpy()
    return a


class Prediction:
    """
    The model's output for one image.

    Attributes:
        instances (Instances): on the CPU, in original-image pixels (may be None for models
            that predict no instances).
        arrays (PredictionArrays): every output as numpy arrays, what JSON and picture show.
        class_names (list[str]): name of each class id.
        height, width (int): the original image size.
        image (np.ndarray): the image as read, in the model's ``INPUT.FORMAT``.
        outputs (dict): the model's raw output dict.
    """

    def __init__(self, outputs: Dict[str, Any], class_names: Sequence[str], image: np.ndarray,
                 input_format: str, metadata: Optional[dict] = None) -> None:
        self.outputs = outputs
        self.instances = outputs["instances"].to("cpu") if "instances" in outputs else None
        self.class_names = class_names
        self.image = image
        self.input_format = input_format
        self.height, self.width = image.shape[:2]
        self.metadata = dict(metadata or {"thing_classes": list(class_names)})
        self.arrays = arrays_of(outputs, self.height, self.width)

    def class_name(self, class_id: int) -> str:
        if 0 <= class_id < len(self.class_names):
            return self.class_names[class_id]
        return str(class_id)

    def to_json(self, image_name: Optional[str] = None, min_score: float = 0.0) -> dict:
        """JSON data, as :func:`d2persist.predict.outputs.prediction_json` describes it."""
        return prediction_json(self.arrays, self.metadata, image_name, min_score)

    def draw(self, metadata: Optional[Union[dict, "Metadata"]], min_score: float = 0.0
             ) -> np.ndarray:
        """
        The picture of this prediction (RGB uint8; upscaled to
        :data:`~d2persist.predict.outputs.MIN_DRAW_SIZE` px when smaller), drawn by the same code
        as the ONNX Runtime predictor's (:func:`~d2persist.predict.outputs.draw_prediction`).
        """
        from detectron2.data.detection_utils import convert_image_to_rgb

        rgb = convert_image_to_rgb(self.image, self.input_format)
        meta = self.metadata if metadata is None else _as_dict(metadata)
        return draw_prediction(rgb, self.arrays, meta, min_score=min_score)


def _as_dict(metadata):
    """A detectron2 ``Metadata`` or a dict, as a dict."""
    return metadata.as_dict() if hasattr(metadata, "as_dict") else dict(metadata)


class Predictor:
    """
    Predicts with a model rebuilt from d2persist artifacts (see :func:`load_predictor`).

    Call it with an image path, or an array and its ``channel_order``.
    """

    def __init__(self, model: torch.nn.Module, augmentation: List["Augmentation"],
                 input_format: str, metadata: dict, device: str) -> None:
        """
        Args:
            model (nn.Module): in eval mode, on ``device``.
            augmentation (list[Augmentation]): test-time augmentations, e.g. ResizeShortestEdge.
            input_format (str): the model's ``INPUT.FORMAT``.
            metadata (dict): dataset metadata; ``thing_classes`` names the classes.
            device (str): where the model runs.
        """
        from detectron2.data import transforms as T

        self.model = model
        self.weights = ""  # which weights, in words (set by load_predictor)
        self.backend = PYTORCH.backend
        self.precision = PYTORCH.precision
        self.sha256: Optional[str] = None  # of the weights file (set by load_torch_predictor)
        self.evaluation: Optional[dict] = None  # a bundle's self-evaluation (its manifest's)
        self.problem = ""  # the sentence saying it recorded this backend as failed, if it did
        self.augmentation = T.AugmentationList(augmentation)
        self.input_format = input_format
        self.metadata = metadata
        self.device = device
        self.class_names = class_names_of(metadata)

    def visualizer_metadata(self) -> "Metadata":
        """A detectron2 ``Metadata`` holding the bundle's metadata, for the Visualizer."""
        from detectron2.data.catalog import Metadata

        meta = Metadata()
        for k, v in self.metadata.items():
            if k != "name":
                setattr(meta, k, v)
        return meta

    def read(self, path: str) -> np.ndarray:
        """Read an image file in the model's input format (see :func:`read_image_file`)."""
        return read_image_file(path, self.input_format)

    def __call__(self, image: Union[str, "os.PathLike[str]", bytes, np.ndarray],
                 channel_order: Optional[str] = None) -> Prediction:
        """
        Args:
            image (str, bytes or np.ndarray): an image file, an image file's bytes (decoded as
                the file is read; not verified first, as a file is: see
                :func:`~d2persist.predict.images.check_image_bytes`), or an HxW/HxWxC uint8
                array.
            channel_order (str): for an array: "BGR", "RGB" or "L". Must be given, so that
                a channel-order mistake cannot pass silently.

        Returns:
            Prediction
        """
        from detectron2.data import transforms as T

        image = image_input(image, channel_order, self.input_format, read=read_image_file,
                            decode=decode_image_data)
        height, width = image.shape[:2]
        aug_input = T.AugInput(image)
        try:
            self.augmentation(aug_input)
        except ValueError as e:  # PIL: "height and width must be > 0" (a very thin image)
            raise InputImageError(f"An image of {width}x{height} pixels cannot be resized for "
                                  f"the model ({e}).") from None
        tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        with torch.inference_mode():
            outputs = self.model([{"image": tensor.to(self.device), "height": height,
                                   "width": width}])[0]
        return Prediction(outputs, self.class_names, image, self.input_format, self.metadata)


def torch_device(device: Optional[str] = None) -> str:
    """
    The device PyTorch predicts on here: ``device``, or the GPU if one is available when None.

    Raises:
        D2PersistError: a CUDA device where PyTorch sees none.
    """
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.split(":")[0] == "cuda" and not torch.cuda.is_available():
        raise D2PersistError("Device cuda was asked for, but PyTorch sees no CUDA device here; "
                             "use cpu.")
    return device


def load_torch_predictor(
    path: str,
    device: Optional[str] = None,
    opts: Optional[Sequence[str]] = None,
    allowed_targets: Optional[Sequence[str]] = None,
    sha256: Optional[str] = None,
) -> "Predictor":
    """
    Load a predictor from an export folder or a training OUTPUT_DIR.

    Args:
        path (str): an export bundle, or a run folder (its export if complete, else its newest
            checkpoint that verifies and its config.yaml). A yacs run's
            ``PERSIST.CONFIG_EXTENSIONS`` are applied (and their modules imported, which
            registers a project's models) before the model is built.
        device (str): "cpu" or "cuda"; the GPU if one is available when None.
        opts (list[str]): ``KEY VALUE`` pairs that override the config (yacs configs), or
            ``key=value`` overrides (LazyConfigs).
        allowed_targets (list[str]): LazyConfig only: module prefixes whose callables the
            config may instantiate, in addition to detectron2's and torch.nn's.
        sha256 (str): a run folder's checkpoint by its sha256, not the newest (see
            :func:`~d2persist.artifacts.resolve.resolve_artifacts`).

    Returns:
        Predictor
    """
    art = resolve_artifacts(path, sha256)
    device = torch_device(device)
    model, augmentation, input_format = build_model_from_config(
        art.config, art.config_kind, opts, allowed_targets, art.config_extensions
    )
    loaded = load_weights(model, art.weights_path) or {}
    model.to(device).eval()
    predictor = Predictor(model, augmentation, input_format, art.metadata, device)
    source = dict(art.source)
    if source.get("iteration") is None and loaded.get("iteration") is not None:
        source["iteration"] = loaded["iteration"]  # model_final.pth's, from the file
    if loaded.get("ema"):
        source.update(weights="ema", ema=loaded["ema"])
    predictor.weights = describe_source(source)
    # the weights file's identity (d2persist predict's jobs)
    predictor.sha256 = art.weights_sha256()  # (a stock checkpoint's: hashed now)
    art.check_unchanged()  # what was loaded is what was verified, and what sha256 names
    predictor.evaluation = art.evaluation
    predictor.problem = art.problem
    logger.info("Loaded %s from %s: %s", art.kind, art.weights_path, predictor.weights)
    if art.problem:
        logger.warning(art.problem)
    return predictor
