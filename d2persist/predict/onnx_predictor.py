"""
Prediction with ONNX Runtime from an export bundle's ``model.onnx``, without torch,
torchvision or detectron2: numpy, Pillow and onnxruntime only.

It reproduces detectron2's evaluation path around the graph: ``read_image`` (EXIF orientation,
``INPUT.FORMAT``, gray and RGBA), the test-time ``ResizeShortestEdge`` on uint8, and after it
what each task's (:data:`d2persist.export.onnx_graph.TASKS`) post-processing does:
``detector_postprocess`` (boxes rescaled to the original size and clipped, empty boxes
dropped, masks pasted as ``paste_masks_in_image`` does and thresholded at 0.5, keypoints
rescaled), ``heatmaps_to_keypoints``, ``sem_seg_postprocess`` (logits resized bilinearly, then
arg-maxed), and PanopticFPN's ``combine_semantic_and_instance_outputs``.
"""

import logging
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..artifacts.bundle import check_artifacts_folder, find_bundle, read_manifest
from ..artifacts.manifest import (
    bundle_source, describe_source, evaluation_problem, metadata_from_json,
)
from ..errors import ArtifactError, D2PersistError
from ..files.atomic import atomic_path, check_unchanged, file_identity
from ..files.cache import note_used, remove_unused
from ..files.mirror import is_url
from ..layout import ONNX, ONNX_TASKS, PRECISIONS, cache_root, onnx_model
from .images import image_input, resize_shortest_edge
from .outputs import PredictionArrays, class_names_of, draw_prediction, prediction_json

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["OnnxPredictor", "OnnxPrediction", "load_onnx_predictor", "bundle_onnx_model",
           "onnx_model_file", "onnx_weights_words", "create_session", "paste_masks",
           "resize_bilinear", "heatmaps_to_keypoints", "combine_panoptic"]

logger = logging.getLogger(__name__)


def _interpolation_matrix(coords, size):
    """Bilinear weights (len(coords) x size) of ``grid_sample``, zero outside [0, size)."""
    lo = np.floor(coords)
    frac = (coords - lo).astype(np.float32)
    lo = lo.astype(np.int64)
    out = np.zeros((len(coords), size), dtype=np.float32)
    rows = np.arange(len(coords))
    for idx, weight in ((lo, 1.0 - frac), (lo + 1, frac)):
        ok = (idx >= 0) & (idx < size)
        out[rows[ok], idx[ok]] += weight[ok]
    return out


def paste_masks(masks: np.ndarray, boxes: np.ndarray, height: int, width: int,
                threshold: float = 0.5) -> np.ndarray:
    """
    Paste M x M mask probabilities into their boxes of an image, as detectron2's
    ``paste_masks_in_image`` does on the CPU (bilinear ``grid_sample``, ``align_corners=False``,
    each mask within its box widened by a pixel), then keep ``>= threshold``.

    Args:
        masks (ndarray): N x M x M float.
        boxes (ndarray): N x 4 XYXY in image pixels.

    Returns:
        ndarray: N x height x width bool.
    """
    out: np.ndarray = np.zeros((len(masks), height, width), dtype=bool)
    for i, (mask, box) in enumerate(zip(masks.astype(np.float32), boxes.astype(np.float32))):
        x0, y0, x1, y1 = box
        xa, ya = max(int(np.floor(x0)) - 1, 0), max(int(np.floor(y0)) - 1, 0)
        xb, yb = min(int(np.ceil(x1)) + 1, width), min(int(np.ceil(y1)) + 1, height)
        if xb <= xa or yb <= ya:
            continue
        mh, mw = mask.shape
        gx = (np.arange(xa, xb, dtype=np.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
        gy = (np.arange(ya, yb, dtype=np.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
        wx = _interpolation_matrix(((gx + 1) * mw - 1) / 2, mw)
        wy = _interpolation_matrix(((gy + 1) * mh - 1) / 2, mh)
        out[i, ya:yb, xa:xb] = (wy @ mask @ wx.T) >= threshold
    return out


def _bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """torch's bilinear weights (size_out x size_in), ``align_corners=False``, no antialias."""
    src = (np.arange(size_out, dtype=np.float32) + 0.5) * np.float32(size_in / size_out) - 0.5
    src = np.maximum(src, 0)
    lo = np.floor(src).astype(np.int64)
    frac = (src - lo).astype(np.float32)
    lo = np.minimum(lo, size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    out: np.ndarray = np.zeros((size_out, size_in), dtype=np.float32)
    rows = np.arange(size_out)
    np.add.at(out, (rows, lo), 1 - frac)
    np.add.at(out, (rows, hi), frac)
    return out


def _bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """torch's bicubic weights (size_out x size_in), ``align_corners=False``, A = -0.75."""
    a = -0.75
    src = (np.arange(size_out, dtype=np.float32) + 0.5) * np.float32(size_in / size_out) - 0.5
    base = np.floor(src).astype(np.int64)
    t = (src - base).astype(np.float32)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = (far(t + 1), near(t), near(1 - t), far(2 - t))
    out: np.ndarray = np.zeros((size_out, size_in), dtype=np.float32)
    rows = np.arange(size_out)
    for k, w in enumerate(weights):
        np.add.at(out, (rows, np.clip(base - 1 + k, 0, size_in - 1)), w)
    return out


def resize_bilinear(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """``F.interpolate(maps[None], (height, width), mode="bilinear", align_corners=False)[0]``
    of C x h x w maps, as detectron2's ``sem_seg_postprocess`` resizes logits."""
    wy = _bilinear_matrix(maps.shape[1], height)
    wx = _bilinear_matrix(maps.shape[2], width)
    return np.einsum("yh,chw,xw->cyx", wy, maps.astype(np.float32), wx, optimize=True)


def heatmaps_to_keypoints(maps: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """
    detectron2's ``heatmaps_to_keypoints`` (as ``keypoint_rcnn_inference`` uses it): each
    detection's K x S x S heatmap logits resized (bicubic) to its box, and each keypoint at its
    arg-max pixel.

    Args:
        maps (ndarray): N x K x S x S logits. boxes (ndarray): N x 4 XYXY (resized image).

    Returns:
        ndarray: N x K x 3: x, y (image pixels) and score (the full-size map's softmax at the
        keypoint, normalized over the S x S map, as detectron2 scores it).
    """
    maps = maps.astype(np.float32)
    out = np.zeros((len(maps), maps.shape[1] if maps.ndim == 4 else 0, 3), dtype=np.float32)
    for i, (heat, box) in enumerate(zip(maps, boxes.astype(np.float32))):
        w = max(box[2] - box[0], np.float32(1))
        h = max(box[3] - box[1], np.float32(1))
        wc, hc = np.ceil(w), np.ceil(h)
        full = np.einsum("yh,khw,xw->kyx", _bicubic_matrix(heat.shape[1], int(hc)), heat,
                         _bicubic_matrix(heat.shape[2], int(wc)), optimize=True)
        flat = full.reshape(len(full), -1)
        pos = flat.argmax(axis=1)
        top = flat[np.arange(len(flat)), pos]
        x_int, y_int = pos % int(wc), pos // int(wc)
        out[i, :, 0] = (x_int.astype(np.float32) + 0.5) * (w / wc) + box[0]
        out[i, :, 1] = (y_int.astype(np.float32) + 0.5) * (h / hc) + box[1]
        out[i, :, 2] = 1.0 / np.exp(heat - top[:, None, None]).sum(axis=(1, 2))
    return out


def combine_panoptic(masks: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                     semantic: np.ndarray, overlap_thresh: float, stuff_area_thresh: float,
                     instances_score_thresh: float) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """
    PanopticFPN's ``combine_semantic_and_instance_outputs`` in numpy.

    Args:
        masks (ndarray): N x H x W bool. scores, classes: N. semantic (ndarray): H x W class ids
            (0: things).

    Returns:
        tuple: (H x W int segment ids, 0 where none; segments_info as detectron2 gives it).
    """
    panoptic = np.zeros(semantic.shape, dtype=np.int64)
    info: List[Dict[str, Any]] = []
    current = 0
    for i in np.argsort(-np.asarray(scores, dtype=np.float32), kind="stable"):
        score = float(scores[i])
        if score < instances_score_thresh:
            break
        mask = masks[i]
        area = int(mask.sum())
        if area == 0:
            continue
        claimed = int((mask & (panoptic > 0)).sum())
        if claimed / area > overlap_thresh:
            continue
        if claimed:
            mask = mask & (panoptic == 0)
        current += 1
        panoptic[mask] = current
        info.append({"id": current, "isthing": True, "score": score,
                     "category_id": int(classes[i]), "instance_id": int(i)})
    for label in np.unique(semantic).tolist():
        if label == 0:  # things
            continue
        mask = (semantic == label) & (panoptic == 0)
        area = int(mask.sum())
        if area < stuff_area_thresh:
            continue
        current += 1
        panoptic[mask] = current
        info.append({"id": current, "isthing": False, "category_id": int(label), "area": area})
    return panoptic, info


class OnnxPrediction:
    """
    The model's output for one image, in original-image pixels.

    Masks are pasted into the image when first needed: :meth:`to_json` and :meth:`draw` paste
    only those of the instances they show (a threshold of 0.5 often leaves most of the 100 a
    model returns out); reading ``masks`` or ``arrays``, or a threshold that shows all, pastes
    them all, once.

    Attributes:
        boxes (ndarray): N x 4 XYXY. scores (ndarray): N. classes (ndarray): N int.
        masks (ndarray or None): N x H x W bool.
        arrays (PredictionArrays): every output (also keypoints, semantic and panoptic maps),
            what JSON and picture show.
        class_names (list[str]): name of each class id.
        image (ndarray): the image as read, in the model's input format.
        height, width (int): the original image size.
    """

    def __init__(self, boxes: Optional[np.ndarray], scores: Optional[np.ndarray],
                 classes: Optional[np.ndarray], masks: Optional[np.ndarray],
                 class_names: Sequence[str], image: np.ndarray, input_format: str,
                 metadata: Optional[dict] = None, mask_probs: Optional[np.ndarray] = None,
                 **more: Any) -> None:
        """
        Args:
            mask_probs: instead of ``masks``, the N x M x M mask probabilities within the
                boxes, pasted (:func:`paste_masks`) when needed.
            more: the other fields of :class:`~d2persist.predict.outputs.PredictionArrays`
                (``keypoints``, ``sem_seg``, ``panoptic``, ``segments_info``, ...).
        """
        self.boxes, self.scores, self.classes = boxes, scores, classes
        self._masks, self._mask_probs = masks, mask_probs
        self.class_names = class_names
        self.image = image
        self.input_format = input_format
        self.height, self.width = image.shape[:2]
        self.metadata = dict(metadata or {"thing_classes": list(class_names)})
        self._more = more
        self._arrays: Optional[PredictionArrays] = None
        self._shown_at: Optional[Tuple[float, PredictionArrays]] = None

    @property
    def masks(self) -> Optional[np.ndarray]:
        if self._masks is None and self._mask_probs is not None:
            assert self.boxes is not None  # masks come with boxes
            self._masks = paste_masks(self._mask_probs, self.boxes, self.height, self.width)
        return self._masks

    @property
    def arrays(self) -> PredictionArrays:
        if self._arrays is None:
            self._arrays = PredictionArrays(self.height, self.width, boxes=self.boxes,
                                            scores=self.scores, classes=self.classes,
                                            masks=self.masks, **self._more)
        return self._arrays

    def _shown(self, min_score: float) -> PredictionArrays:
        """
        The arrays of the instances scoring at least ``min_score``, their masks pasted (those
        of the last threshold asked are kept: the JSON and the picture of a job share them).
        """
        if self._masks is not None or self._mask_probs is None:
            return self.arrays
        assert self.boxes is not None and self.scores is not None and self.classes is not None
        keep = np.flatnonzero(np.asarray(self.scores) >= min_score)
        if len(keep) == len(self.scores):  # all of them: pasted once, for good
            return self.arrays
        if self._shown_at is None or self._shown_at[0] != min_score:
            more = dict(self._more)
            if more.get("keypoints") is not None:
                more["keypoints"] = more["keypoints"][keep]
            masks = paste_masks(self._mask_probs[keep], self.boxes[keep], self.height, self.width)
            self._shown_at = (min_score, PredictionArrays(
                self.height, self.width, boxes=self.boxes[keep], scores=self.scores[keep],
                classes=self.classes[keep], masks=masks, **more))
        return self._shown_at[1]

    def __len__(self):
        return 0 if self.scores is None else len(self.scores)

    def to_json(self, image_name: Optional[str] = None, min_score: float = 0.0) -> dict:
        """JSON data, as :func:`d2persist.predict.outputs.prediction_json` describes it."""
        return prediction_json(self._shown(min_score), self.metadata, image_name, min_score)

    def draw(self, metadata: Optional[dict], min_score: float = 0.0) -> np.ndarray:
        """The visualization (RGB uint8), as :func:`d2persist.predict.outputs.draw_prediction`
        draws."""
        if self.input_format == "L":
            rgb = np.repeat(self.image, 3, axis=2)
        else:
            rgb = self.image[:, :, ::-1] if self.input_format == "BGR" else self.image
        return draw_prediction(rgb, self._shown(min_score),
                               self.metadata if metadata is None else metadata,
                               min_score=min_score)


class OnnxPredictor:
    """
    Predicts with an export bundle's ``model.onnx`` in ONNX Runtime (see
    :func:`load_onnx_predictor`). Call it with an image path, or an array and its
    ``channel_order``.
    """

    def __init__(self, session: "ort.InferenceSession", contract: dict, metadata: dict,
                 onnx_entry: Optional[dict] = None) -> None:
        """
        Args:
            session (onnxruntime.InferenceSession): of the bundle's ``model.onnx``.
            contract (dict): the manifest's ``input`` (format, test sizes).
            metadata (dict): dataset metadata; ``thing_classes`` names the classes.
            onnx_entry (dict): the manifest's ``onnx`` entry: its ``task`` (``rcnn`` for a
                bundle written before tasks) and, for ``panoptic``, its ``combine`` thresholds.
        """
        self.session = session
        self.input_format = contract["format"]
        self.min_size = int(contract.get("min_size_test") or 0)
        self.max_size = int(contract.get("max_size_test") or 0)
        self.metadata = metadata
        self.class_names = class_names_of(metadata)
        self.onnx_entry = dict(onnx_entry or {})
        self.task = self.onnx_entry.get("task", "rcnn")
        if self.task not in ONNX_TASKS:  # a later d2persist's: its outputs would be misread
            raise ArtifactError(
                f"The bundle's ONNX model is of task {self.task!r}, which this d2persist does "
                f"not know ({', '.join(ONNX_TASKS)}): predict with a newer d2persist.")
        self._outputs = [o.name for o in session.get_outputs()]
        self.weights = ""  # which weights, in words (set by load_onnx_predictor)
        self.backend = ONNX.backend
        self.precision = ONNX.precision
        self.sha256: Optional[str] = None  # of the model file (set by load_onnx_predictor)
        self.evaluation: Optional[dict] = None  # the bundle's self-evaluation (its manifest's)
        self.problem = ""  # the sentence saying it recorded this backend as failed, if it did
        self.cached = False  # whether the session's optimized graph came from the cache

    def visualizer_metadata(self) -> dict:
        return self.metadata

    def __call__(self, image: Union[str, "os.PathLike[str]", bytes, np.ndarray],
                 channel_order: Optional[str] = None) -> OnnxPrediction:
        """
        Args:
            image (str, bytes or ndarray): an image file, an image file's bytes (decoded as
                the file is read; not verified first, as a file is: see
                :func:`~d2persist.predict.images.check_image_bytes`), or an HxW/HxWxC uint8
                array.
            channel_order (str): for an array: "BGR", "RGB" or "L" (required).
        """
        image = image_input(image, channel_order, self.input_format)
        height, width = image.shape[:2]
        resized = resize_shortest_edge(image, self.min_size, self.max_size)
        chw = np.ascontiguousarray(resized.transpose(2, 0, 1))
        out = dict(zip(self._outputs, self.session.run(None, {"image": chw})))
        rh, rw = (int(x) for x in out["image_size"])
        more: Dict[str, Any] = {}
        boxes = scores = classes = masks = mask_probs = None
        if "sem_seg" in out:
            more["sem_seg"] = resize_bilinear(out["sem_seg"], height, width).argmax(axis=0)
        if "proposals" in out:
            keep, more["proposals"] = _to_original(out["proposals"], rh, rw, height, width)
            more["objectness"] = out["objectness_logits"][keep]
        if "boxes" in out:
            keep, boxes = _to_original(out["boxes"], rh, rw, height, width)
            scores = out["scores"][keep]
            classes = out["classes"][keep].astype(np.int64)
            if "masks" in out:
                mask_probs = out["masks"][keep][:, 0]  # pasted when needed
            if "keypoint_heatmaps" in out:
                kps = heatmaps_to_keypoints(out["keypoint_heatmaps"][keep],
                                            out["boxes"][keep].astype(np.float32))
                kps[:, :, 0] *= np.float32(width / rw)
                kps[:, :, 1] *= np.float32(height / rh)
                more["keypoints"] = kps
        if self.task == "panoptic":  # its graph has rcnn's outputs (masks too) and sem_seg
            assert (mask_probs is not None and boxes is not None and scores is not None
                    and classes is not None)
            masks, mask_probs = paste_masks(mask_probs, boxes, height, width), None
            more["panoptic"], more["segments_info"] = combine_panoptic(
                masks, scores, classes, more["sem_seg"], **self.onnx_entry["combine"])
        return OnnxPrediction(boxes, scores, classes, masks, self.class_names, image,
                              self.input_format, self.metadata, mask_probs=mask_probs, **more)


def _to_original(boxes, rh, rw, height, width):
    """``detector_postprocess`` of boxes: (indices kept, N x 4 boxes in the original image)."""
    boxes = boxes.astype(np.float32)
    boxes[:, 0::2] *= np.float32(width / rw)
    boxes[:, 1::2] *= np.float32(height / rh)
    np.clip(boxes[:, 0::2], 0, width, out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0, height, out=boxes[:, 1::2])
    keep = np.flatnonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
    return keep, boxes[keep]


def _cache_key(sha256, providers, options):
    import hashlib
    import platform

    import onnxruntime as ort

    parts = [sha256, ort.__version__, platform.machine(), ",".join(providers),
             str(int(options.graph_optimization_level))]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _from_onnxruntime(e: BaseException) -> bool:
    """Whether ``e`` is one of ONNX Runtime's own errors (they derive from Exception alone)."""
    return type(e).__module__.startswith("onnxruntime")


def create_session(model_path: str, sha256: Optional[str] = None,
                   providers: Optional[Sequence[str]] = None, threads: Optional[int] = None,
                   cache: bool = True, spin: bool = True,
                   identity: Optional[Tuple[int, int, int, int]] = None
                   ) -> Tuple["ort.InferenceSession", bool]:
    """
    An ONNX Runtime session of ``model_path``. With ``sha256`` (the file's, as its manifest
    states and the caller verified) and ``cache``, the graph ONNX Runtime optimizes is cached
    under ``$D2PERSIST_CACHE/onnxruntime``, keyed by that sha256, the ONNX Runtime version, the
    machine and the providers, and written atomically; a later process loads the optimized
    graph instead of optimizing again. A cached graph that does not load is optimized anew;
    graphs no process used for a week are removed when another is cached
    (:mod:`d2persist.files.cache`).
    ``spin=False`` turns off the spinning of ONNX Runtime's idle intra-op threads
    (``session.intra_op.allow_spinning``), for processes that share their cores. With
    ``identity`` (the file's :func:`~d2persist.files.atomic.file_identity` from before the
    caller verified it), a file replaced since is refused, its graph not cached under the
    sha256 of the file it replaced.

    Returns:
        tuple: ``(session, cached)``, whether the session came from the cache.

    Raises:
        ArtifactError: ONNX Runtime cannot open the model (a damaged file whose manifest entry
            was made to match it, a graph this ONNX Runtime does not support), or it was
            replaced since ``identity``.
    """
    import onnxruntime as ort

    def unchanged(session):
        if identity is not None:
            check_unchanged(model_path, identity)
        return session

    providers = list(providers or ["CPUExecutionProvider"])

    def options():
        o = ort.SessionOptions()
        if threads:
            o.intra_op_num_threads = int(threads)
        if not spin:
            o.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return o

    def open_model(opts):
        try:
            return ort.InferenceSession(model_path, opts, providers=providers)
        except Exception as e:
            if not _from_onnxruntime(e):
                raise
            raise ArtifactError(f"{model_path} does not open in ONNX Runtime ("
                                f"{type(e).__name__}: {' '.join(str(e).split())}).") from None

    if not (cache and sha256):
        return unchanged(open_model(options())), False
    folder = os.path.join(cache_root(), "onnxruntime")
    opts = options()
    cached = os.path.join(folder, _cache_key(sha256, providers, opts) + ".onnx")
    if os.path.isfile(cached):
        note_used(cached)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(cached, opts, providers=providers), True
        except Exception as e:  # damaged or foreign: optimize again, replacing it
            logger.warning("Cached ONNX Runtime graph %s does not load (%s); optimizing %s "
                           "again.", cached, e, model_path)
    try:
        os.makedirs(folder, exist_ok=True)
        with atomic_path(cached) as tmp:
            opts = options()
            opts.optimized_model_filepath = tmp
            opts.log_severity_level = 3  # not the warning that the graph suits this CPU only
            session = unchanged(ort.InferenceSession(model_path, opts, providers=providers))
    except Exception as e:  # a read-only or full cache: predict without one
        if not isinstance(e, OSError) and not _from_onnxruntime(e):
            raise
        session = unchanged(open_model(options()))  # (one that does not open: one sentence)
        logger.warning("Cannot cache the optimized ONNX Runtime graph in %s (%s).", folder,
                       " ".join(str(e).split()))
        return session, False
    remove_unused(folder, keep=[os.path.basename(cached)], is_entry=lambda n: n.endswith(".onnx"))
    return session, False


def bundle_onnx_model(path: str, precision: str = ONNX.precision) -> Tuple[str, str, dict]:
    """
    ``(bundle, file name, manifest)`` of the ONNX model at ``precision`` of the bundle at
    ``path`` (a bundle, or a run folder whose export is complete), its file checked against
    the manifest.

    Raises:
        D2PersistError: ``precision`` is not one of :data:`d2persist.layout.PRECISIONS`.
        ArtifactError: no complete bundle, no such model in it (with the reason its export
            failed, if it did), or a model file that does not match its manifest entry.
    """
    return _verified_onnx_model(path, precision)[:3]


def _verified_onnx_model(path: str, precision: str) -> Tuple[str, str, dict, Any]:
    """:func:`bundle_onnx_model`, and the model file's identity from before it was verified."""
    if precision not in PRECISIONS:
        raise D2PersistError(
            f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}.")
    check_artifacts_folder(path)
    bundle = find_bundle(path)
    if bundle is None:
        raise ArtifactError(f"{path} holds no complete export bundle (manifest.json) to run "
                            "with ONNX Runtime.")
    name = onnx_model(precision).file
    identity = file_identity(os.path.join(bundle, name))  # (what is loaded: this file)
    manifest = read_manifest(bundle, only=[name])
    onnx_model_file(manifest, precision, bundle, path)
    return bundle, name, manifest, identity


def onnx_model_file(manifest: dict, precision: str, bundle: str, path: str) -> str:
    """
    The file name of the ONNX model at ``precision`` in the bundle whose ``manifest`` this is.

    Args:
        manifest (dict): the bundle's manifest.
        precision (str): one of :data:`d2persist.layout.PRECISIONS`.
        bundle (str): where the bundle is (a folder or a URL), for the error.
        path (str): the artifacts as the user gave them, for the error.

    Raises:
        ArtifactError: the bundle has no such model (with the reason its export failed, if it
            did).
    """
    model = onnx_model(precision)
    entry = manifest.get(model.entry)
    if not entry or model.file not in manifest["files"]:
        why = f" (its export failed: {entry['error']})" if entry and "error" in entry else ""
        hint = (f"tools/export_model.py --artifacts RUN --format {model.format} where its run "
                "is, and upload the bundle again" if is_url(path) else
                f"tools/export_model.py --artifacts {path} --format {model.format}")
        raise ArtifactError(f"The bundle {bundle} has no {model.file}{why}; add one with {hint}.")
    return model.file


def onnx_weights_words(manifest: dict, name: str) -> str:
    """Which weights the bundle's ONNX model ``name`` holds, in words."""
    return describe_source(bundle_source(manifest)) + f" ({name})"


def load_onnx_predictor(path: str, providers: Optional[Sequence[str]] = None,
                        threads: Optional[int] = None, precision: str = ONNX.precision,
                        cache: bool = True, spin: bool = True) -> OnnxPredictor:
    """
    Load an :class:`OnnxPredictor` from an export bundle, or a run folder's export.

    Args:
        path (str): the bundle, or a training OUTPUT_DIR whose export is complete.
        providers (list[str]): ONNX Runtime execution providers (default: the CPU).
        threads (int): ONNX Runtime's intra-op threads (default: its own choice).
        precision (str): "float" (``model.onnx``) or "int8" (``model.int8.onnx``, PERSIST.
            EXPORT_FORMATS "onnx-int8").
        cache (bool): cache the optimized graph (see :func:`create_session`).
        spin (bool): ONNX Runtime's idle threads spin waiting for work (its default, the
            lowest latency on cores of one's own); False where the process shares its cores
            with others (Ray's actors and replicas), which measured faster there.

    Raises:
        ArtifactError: no complete bundle, no ONNX model in it (with the reason its export
            failed, if it did), or a model file that does not match its manifest entry.
    """
    import onnxruntime as ort

    bundle, name, manifest, identity = _verified_onnx_model(path, precision)
    model = onnx_model(precision)
    model_path = os.path.join(bundle, name)
    session, cached = create_session(model_path, manifest["files"][name].get("sha256"),
                                     providers, threads, cache, spin, identity)
    predictor = OnnxPredictor(session, manifest["input"],
                              metadata_from_json(manifest.get("metadata") or {}),
                              manifest.get("onnx"))
    predictor.weights = onnx_weights_words(manifest, name)
    predictor.cached = cached
    predictor.sha256 = manifest["files"][name].get("sha256")  # (verified by read_manifest)
    predictor.precision = precision
    logger.info("Loaded %s with ONNX Runtime %s%s: %s", model_path, ort.__version__,
                " (optimized graph from the cache)" if cached else "", predictor.weights)
    problem = evaluation_problem(manifest, model.backend)
    if problem:
        logger.warning(problem)
    predictor.evaluation = manifest.get("evaluation")
    predictor.problem = problem or ""
    return predictor
