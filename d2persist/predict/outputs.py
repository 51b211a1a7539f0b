"""
Predictions as JSON (masks as COCO RLE) and as a picture, with numpy and Pillow only, so that
both predictors write the same JSON and the ONNX Runtime one needs neither torch nor pycocotools.

Every output detectron2's models give has one array form, :class:`PredictionArrays`, which both
predictors fill; :func:`prediction_json` and :func:`draw_prediction` read only that, so equal
predictions give equal JSON and equal pictures whatever the backend.
"""

import dataclasses
import itertools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ..errors import D2PersistError

__all__ = [
    "PredictionArrays",
    "min_score_of",
    "prediction_json",
    "draw_prediction",
    "rle_decode",
    "class_names_of",
    "rle_encode",
    "instances_json",
    "draw_instances",
    "layout_labels",
    "MIN_DRAW_SIZE",
    "KEYPOINT_THRESHOLD",
]


def min_score_of(value: Any) -> float:
    """
    ``value`` (a number, or its text) as a confidence threshold.

    Args:
        value: what the user gave (``--confidence-threshold``, ``?min_score=``).

    Returns:
        float: from 0 to 1.

    Raises:
        D2PersistError: ``value`` is not a number from 0 to 1 (a higher one would leave every
            instance out, silently).
    """
    try:
        score = float(value)
    except (TypeError, ValueError):
        score = float("nan")
    if not 0.0 <= score <= 1.0:
        raise D2PersistError(f"A confidence threshold is a number from 0 to 1, not {value!r}.")
    return score


def class_names_of(metadata: dict) -> List[str]:
    """The class names of dataset metadata: ``thing_classes``, else ``stuff_classes``."""
    return list(metadata.get("thing_classes") or metadata.get("stuff_classes") or [])


def rle_encode(mask: np.ndarray) -> dict:
    """
    COCO's compressed RLE of a binary HxW mask, as ``pycocotools.mask.encode`` gives it
    (``counts`` as a str).
    """
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size:
        edges: np.ndarray = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
        if flat[0]:
            runs = [0] + runs  # counts start with a run of zeros
    else:
        runs = [0]
    out = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return {"size": [int(h), int(w)], "counts": "".join(out)}


def rle_decode(rle: dict) -> np.ndarray:
    """The binary HxW mask of a compressed COCO RLE (the inverse of :func:`rle_encode`)."""
    h, w = rle["size"]
    counts: List[int] = []
    s, i = rle["counts"], 0
    while i < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[i]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    flat = np.zeros(h * w, dtype=bool)
    pos, value = 0, False
    for n in counts:
        if value:
            flat[pos:pos + n] = True
        pos += n
        value = not value
    return flat.reshape((w, h)).T


def instances_json(
    height: int,
    width: int,
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    class_names: Sequence[str],
    masks: Optional[np.ndarray] = None,
    keypoints: Optional[np.ndarray] = None,
    image_name: Optional[str] = None,
    min_score: float = 0.0,
) -> dict:
    """
    ``{"image", "height", "width", "instances": [{"category_id", "category_name", "score",
    "bbox" (XYXY, original pixels), "segmentation" (COCO RLE, with masks), "keypoints" ([[x, y,
    score], ...], with keypoints)}]}`` for the instances scoring at least ``min_score``.
    """
    out: Dict[str, Any] = {"image": image_name, "height": int(height), "width": int(width),
                           "instances": []}
    for i in np.flatnonzero(np.asarray(scores) >= min_score):
        cls = int(classes[i])
        item: Dict[str, Any] = {
            "category_id": cls,
            "category_name": class_names[cls] if 0 <= cls < len(class_names) else str(cls),
            "score": float(scores[i]),
            "bbox": [float(x) for x in boxes[i]],
        }
        if masks is not None:
            item["segmentation"] = rle_encode(masks[i])
        if keypoints is not None:
            item["keypoints"] = [[float(v) for v in kp] for kp in keypoints[i]]
        out["instances"].append(item)
    return out


def _color(cls: int, colors: Optional[Sequence[Sequence[int]]]) -> Tuple[int, ...]:
    if colors and 0 <= cls < len(colors):
        return tuple(int(c) for c in colors[cls])
    rng = np.random.default_rng(cls)
    return tuple(int(c) for c in rng.integers(64, 256, 3))


#: Pictures of smaller images are upscaled to this many pixels on the long side.
MIN_DRAW_SIZE = 512


def layout_labels(sizes: Sequence[Tuple[float, float]], anchors: Sequence[Sequence[float]],
                  image_size: Tuple[float, float]) -> List[Tuple[float, float, float, float]]:
    """
    Places label boxes so that no two overlap: each label (``sizes[i]`` = (w, h)) is put at the
    first free spot of its anchor (the top-left corner of its instance's box: above it, inside
    it, then further down), else at the first free spot of the image scanned row by row.

    Args:
        sizes (list[tuple]): (width, height) of each label, in drawing order.
        anchors (list[tuple]): (x0, y0, x1, y1) of each label's instance box.
        image_size (tuple): (width, height) of the picture.

    Returns:
        list[tuple]: (x0, y0, x1, y1) of each label, inside the picture where it fits.
    """
    width, height = image_size
    placed: List[Tuple[float, float, float, float]] = []

    def free(r):
        return all(r[2] <= q[0] or q[2] <= r[0] or r[3] <= q[1] or q[3] <= r[1] for q in placed)

    def rect(x, y, w, h):
        x = min(max(0.0, x), max(0.0, width - w))
        y = min(max(0.0, y), max(0.0, height - h))
        return (x, y, x + w, y + h)

    for (w, h), (bx0, by0, bx1, by1) in zip(sizes, anchors):
        first = rect(bx0, by0 - h, w, h)
        step = max(1.0, h / 2)
        rows = int(height // h) + 1
        candidates = itertools.chain(  # lazily: the first free one is taken
            [first, rect(bx0, by0, w, h), rect(bx0, by1, w, h)],
            (rect(bx0, by0 + k * h, w, h) for k in range(1, rows)),
            (rect(bx0, by0 - k * h, w, h) for k in range(2, rows)),
            (rect(x, y, w, h) for y in np.arange(0, max(1.0, height - h + 1), step)
             for x in np.arange(0, max(1.0, width - w + 1), step)),
        )
        placed.append(next((r for r in candidates if free(r)), first))  # full: overlap at last
    return placed


def _font(size):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1, FreeType)
    except TypeError:  # an older Pillow: its fixed bitmap font
        return ImageFont.load_default()


def draw_instances(
    rgb: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    class_names: Sequence[str],
    masks: Optional[np.ndarray] = None,
    colors: Optional[List] = None,
    min_size: int = MIN_DRAW_SIZE,
) -> np.ndarray:
    """
    The picture of instances (RGB uint8), see :func:`draw_prediction`, which it calls with
    boxes, scores, classes and masks only.
    """
    arrays = PredictionArrays(rgb.shape[0], rgb.shape[1], boxes=np.asarray(boxes),
                              scores=np.asarray(scores), classes=np.asarray(classes), masks=masks)
    meta = {"thing_classes": list(class_names), "thing_colors": colors}
    return draw_prediction(rgb, arrays, meta, min_size=min_size)


@dataclasses.dataclass
class PredictionArrays:
    """
    Every output of a detectron2 model for one image, as numpy arrays in original-image pixels.

    Attributes:
        height, width: the original image size.
        boxes, scores, classes: N x 4 XYXY float, N float, N int (instances; None if none).
        masks: N x H x W bool, or None.
        keypoints: N x K x 3 (x, y, score) float, or None.
        sem_seg: H x W int, the arg-max class of each pixel (semantic segmentation), or None.
        panoptic: H x W int segment ids (0: no segment), or None.
        segments_info: the panoptic segments, as detectron2 gives them: ``id``, ``isthing``,
            ``category_id`` (contiguous thing id, or stuff id), ``area``, ``score`` (things).
        proposals: N x 4 XYXY (RPN proposals), or None. objectness: their N logits.
    """

    height: int
    width: int
    boxes: Optional[np.ndarray] = None
    scores: Optional[np.ndarray] = None
    classes: Optional[np.ndarray] = None
    masks: Optional[np.ndarray] = None
    keypoints: Optional[np.ndarray] = None
    sem_seg: Optional[np.ndarray] = None
    panoptic: Optional[np.ndarray] = None
    segments_info: Optional[List[Dict]] = None
    proposals: Optional[np.ndarray] = None
    objectness: Optional[np.ndarray] = None

    def keep(self, min_score: float) -> np.ndarray:
        """Indices of the instances scoring at least ``min_score``."""
        if self.scores is None:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(np.asarray(self.scores) >= min_score)


def _name(names, i):
    return names[i] if 0 <= i < len(names) else str(i)


def _segment_name(seg, metadata):
    names = metadata.get("thing_classes" if seg["isthing"] else "stuff_classes") or []
    return _name(names, int(seg["category_id"]))


def prediction_json(arrays: PredictionArrays, metadata: dict, image_name: Optional[str] = None,
                    min_score: float = 0.0) -> dict:
    """
    The JSON data of a prediction::

        {"image", "height", "width",
         "instances": [{"category_id", "category_name", "score", "bbox" (XYXY),
                        "segmentation" (COCO RLE, with masks),
                        "keypoints" ([[x, y, score], ...] named by "keypoint_names")}],
         "keypoint_names": [...]                         (keypoint models)
         "sem_seg": [{"category_id", "category_name", "area", "segmentation" (COCO RLE)}]
                                                         (semantic models: one per class present,
                                                          COCO stuff results; they tile the image)
         "panoptic_seg": {"segments_info": [{"id", "category_id", "category_name", "isthing",
                          "area", "score" (things), "segmentation" (COCO RLE)}]}
                                                         (panoptic models; pixels in no segment
                                                          are void)
         "proposals": [{"bbox" (XYXY), "objectness_logit"}]  (RPN-only models)}

    ``instances`` is always there (empty for a model that predicts none); only instances scoring
    at least ``min_score`` are kept. Class ids are the model's contiguous ids: a thing's index in
    the metadata's ``thing_classes``, a semantic class's or a stuff segment's in ``stuff_classes``.
    """
    thing_names = list(metadata.get("thing_classes") or [])
    names = thing_names or list(metadata.get("stuff_classes") or [])
    a = arrays
    if a.boxes is not None:
        assert a.scores is not None and a.classes is not None  # instances: all three, or none
        out = instances_json(a.height, a.width, a.boxes, a.scores, a.classes, names, a.masks,
                             a.keypoints, image_name=image_name, min_score=min_score)
    else:
        empty = np.zeros(0)
        out = instances_json(a.height, a.width, empty, empty, empty, names, image_name=image_name)
    if a.keypoints is not None:
        out["keypoint_names"] = list(metadata.get("keypoint_names") or [])
    if a.sem_seg is not None:
        stuff = list(metadata.get("stuff_classes") or [])
        out["sem_seg"] = []
        for cls in np.unique(a.sem_seg).tolist():
            mask = a.sem_seg == cls
            out["sem_seg"].append({"category_id": int(cls), "category_name": _name(stuff, cls),
                                   "area": int(mask.sum()), "segmentation": rle_encode(mask)})
    if a.panoptic is not None:
        segments = []
        for seg in a.segments_info or []:
            mask = a.panoptic == seg["id"]
            item = {"id": int(seg["id"]), "category_id": int(seg["category_id"]),
                    "category_name": _segment_name(seg, metadata),
                    "isthing": bool(seg["isthing"]), "area": int(mask.sum())}
            if "score" in seg:
                item["score"] = float(seg["score"])
            item["segmentation"] = rle_encode(mask)
            segments.append(item)
        out["panoptic_seg"] = {"segments_info": segments}
    if a.proposals is not None:
        assert a.objectness is not None  # proposals come with their objectness logits
        out["proposals"] = [{"bbox": [float(v) for v in box], "objectness_logit": float(o)}
                            for box, o in zip(a.proposals, a.objectness)]
    return out


#: Keypoints scoring at most this are not drawn (detectron2's Visualizer's threshold).
KEYPOINT_THRESHOLD = 0.05


def _regions(a: PredictionArrays, metadata: dict) -> List[Tuple[np.ndarray, Tuple[int, ...], str]]:
    """(mask, colour, label) of each semantic class or panoptic segment, to draw under all."""
    stuff = list(metadata.get("stuff_classes") or [])
    stuff_colors = metadata.get("stuff_colors")
    out = []
    if a.sem_seg is not None and a.panoptic is None:
        for cls in np.unique(a.sem_seg).tolist():
            out.append((a.sem_seg == cls, _color(cls, stuff_colors), _name(stuff, cls)))
    if a.panoptic is not None:
        for seg in a.segments_info or []:
            if seg["isthing"]:  # things: a box-less instance in its class colour
                color = _color(int(seg["category_id"]), metadata.get("thing_colors"))
                label = f"{_segment_name(seg, metadata)} {float(seg.get('score', 1)) * 100:.0f}%"
            else:
                color = _color(int(seg["category_id"]), stuff_colors)
                label = _segment_name(seg, metadata)
            out.append((a.panoptic == seg["id"], color, label))
    return out


def _keypoint_edges(metadata):
    names = list(metadata.get("keypoint_names") or [])
    index = {n: i for i, n in enumerate(names)}
    return [(index[a], index[b], tuple(int(v) for v in c))
            for a, b, c in metadata.get("keypoint_connection_rules") or []
            if a in index and b in index]


def draw_prediction(rgb: np.ndarray, arrays: PredictionArrays, metadata: Optional[dict],
                    min_score: float = 0.0, min_size: int = MIN_DRAW_SIZE) -> np.ndarray:
    """
    The picture of a prediction (RGB uint8), the same for every backend: semantic classes and
    panoptic segments filled at half opacity in their class colour, each with its name; then
    each instance's mask filled, its box outlined and a "name score%" label on a dark
    background; keypoints as dots joined by the metadata's ``keypoint_connection_rules``;
    RPN proposals outlined. Labels are placed so that none overlaps another
    (:func:`layout_labels`). Instances scoring below ``min_score`` are left out.

    An image smaller than ``min_size`` on its long side is drawn upscaled to it (nearest
    neighbour, so pixels stay visible), so labels are legible; a larger one keeps its size.
    """
    metadata = metadata or {}
    a = arrays
    base = Image.fromarray(np.ascontiguousarray(rgb[:, :, :3]) if rgb.ndim == 3 else rgb)
    base = base.convert("RGB")
    w0, h0 = base.size
    scale = max(1.0, float(min_size) / max(w0, h0)) if min_size else 1.0
    size = (int(round(w0 * scale)), int(round(h0 * scale)))
    if scale > 1:
        base = base.resize(size, Image.NEAREST)
    overlay = np.asarray(base, dtype=np.float32).copy()

    def fill(mask, color):
        m = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
        m = np.asarray(m.resize(size, Image.NEAREST) if scale > 1 else m) > 0
        overlay[m] = overlay[m] * 0.5 + np.array(color, dtype=np.float32) * 0.5
        return m

    labels: List[Tuple[str, Tuple[int, ...]]] = []
    anchors: List[Sequence[float]] = []
    region_labels = []
    for mask, color, label in _regions(a, metadata):
        fill(mask, color)
        ys, xs = np.nonzero(mask)
        if len(xs):  # the label at the region's pixel nearest its median: on the region
            k = np.argmin(np.abs(xs - np.median(xs)) + np.abs(ys - np.median(ys)))
            x, y = (xs[k] + 0.5) * scale, (ys[k] + 0.5) * scale
            region_labels.append((label, color, (x, y, x, y)))
    thing_colors = metadata.get("thing_colors")
    names = list(metadata.get("thing_classes") or metadata.get("stuff_classes") or [])
    # a panoptic model's picture is its panoptic segmentation (its instances are in it)
    keep = a.keep(min_score) if a.panoptic is None else np.zeros(0, dtype=np.int64)
    order = keep[np.argsort(-np.asarray(a.scores, dtype=np.float64)[keep], kind="stable")] \
        if len(keep) else keep
    if a.masks is not None:
        for i in order:
            assert a.classes is not None  # kept instances have classes
            fill(a.masks[i], _color(int(a.classes[i]), thing_colors))
    image = Image.fromarray(overlay.round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    font = _font(max(11, int(round(max(size) / 40))))
    line = max(1, int(round(max(size) / 256)))
    for label, color, anchor in region_labels:
        labels.append((label, color))
        anchors.append(anchor)
    for box in (a.proposals if a.proposals is not None else ()):
        draw.rectangle([float(v) * scale for v in box], outline=(255, 255, 0), width=1)
    for i in order:
        assert a.boxes is not None and a.scores is not None and a.classes is not None
        cls = int(a.classes[i])
        box = [float(v) * scale for v in a.boxes[i]]
        draw.rectangle(box, outline=_color(cls, thing_colors), width=line)
        labels.append((f"{_name(names, cls)} {float(a.scores[i]) * 100:.0f}%",
                       _color(cls, thing_colors)))
        anchors.append(box)
    if a.keypoints is not None:
        edges = _keypoint_edges(metadata)
        radius = max(2, line * 2)
        for i in order:
            kps = np.asarray(a.keypoints[i], dtype=np.float64)
            seen = kps[:, 2] > KEYPOINT_THRESHOLD
            for j, k, color in edges:
                if seen[j] and seen[k]:
                    draw.line([tuple(kps[j, :2] * scale), tuple(kps[k, :2] * scale)],
                              fill=color, width=line + 1)
            for x, y in kps[seen, :2] * scale:
                draw.ellipse([x - radius, y - radius, x + radius, y + radius],
                             fill=(255, 255, 255), outline=(0, 0, 0))
    boxes = []
    for label, _ in labels:
        l, t, r, b = draw.textbbox((0, 0), label, font=font)
        boxes.append(((r - l + 4, b - t + 4), (l, t)))
    spots = layout_labels([b[0] for b in boxes], anchors, size)
    for (label, color), (_, (l, t)), spot in zip(labels, boxes, spots):
        draw.rectangle(spot, fill=(0, 0, 0))
        draw.text((spot[0] + 2 - l, spot[1] + 2 - t), label, fill=color, font=font)
    return np.asarray(image)
