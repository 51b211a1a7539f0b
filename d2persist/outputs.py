"""
Predictions as JSON (masks as COCO RLE) and as a picture, with numpy and Pillow only, so that
both predictors write the same JSON and the ONNX Runtime one needs neither torch nor pycocotools.
"""

import itertools
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "class_names_of",
    "rle_encode",
    "instances_json",
    "draw_instances",
    "layout_labels",
    "MIN_DRAW_SIZE",
]


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
        edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
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
    out = {"image": image_name, "height": int(height), "width": int(width), "instances": []}
    for i in np.flatnonzero(np.asarray(scores) >= min_score):
        cls = int(classes[i])
        item = {
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


def _color(cls, colors):
    if colors and 0 <= cls < len(colors):
        return tuple(int(c) for c in colors[cls])
    rng = np.random.default_rng(cls)
    return tuple(int(c) for c in rng.integers(64, 256, 3))


#: Pictures of smaller images are upscaled to this many pixels on the long side.
MIN_DRAW_SIZE = 512


def layout_labels(sizes, anchors, image_size):
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
    placed = []

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
    The picture of a prediction (RGB uint8), the same for every backend: each mask filled at
    half opacity in its class colour, each box outlined, and a "name score%" label on a dark
    background, labels placed so that none overlaps another (see :func:`layout_labels`).

    An image smaller than ``min_size`` on its long side is drawn upscaled to it (nearest
    neighbour, so pixels stay visible), so labels are legible; a larger one keeps its size.
    """
    base = Image.fromarray(np.ascontiguousarray(rgb[:, :, :3]) if rgb.ndim == 3 else rgb)
    base = base.convert("RGB")
    w0, h0 = base.size
    scale = max(1.0, float(min_size) / max(w0, h0)) if min_size else 1.0
    size = (int(round(w0 * scale)), int(round(h0 * scale)))
    if scale > 1:
        base = base.resize(size, Image.NEAREST)
    overlay = np.asarray(base, dtype=np.float32).copy()
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    for i in order:
        if masks is not None:
            color = np.array(_color(int(classes[i]), colors), dtype=np.float32)
            m = Image.fromarray(np.asarray(masks[i], dtype=np.uint8) * 255)
            m = np.asarray(m.resize(size, Image.NEAREST) if scale > 1 else m) > 0
            overlay[m] = overlay[m] * 0.5 + color * 0.5
    image = Image.fromarray(overlay.round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    font = _font(max(11, int(round(max(size) / 40))))
    line = max(1, int(round(max(size) / 256)))
    labels, sizes, anchors = [], [], []
    for i in order:
        cls = int(classes[i])
        box = [float(v) * scale for v in boxes[i]]
        draw.rectangle(box, outline=_color(cls, colors), width=line)
        name = class_names[cls] if 0 <= cls < len(class_names) else str(cls)
        label = f"{name} {float(scores[i]) * 100:.0f}%"
        l, t, r, b = draw.textbbox((0, 0), label, font=font)
        labels.append((label, _color(cls, colors), (l, t)))
        sizes.append((r - l + 4, b - t + 4))
        anchors.append(box)
    for (label, color, (l, t)), spot in zip(labels, layout_labels(sizes, anchors, size)):
        draw.rectangle(spot, fill=(0, 0, 0))
        draw.text((spot[0] + 2 - l, spot[1] + 2 - t), label, fill=color, font=font)
    return np.asarray(image)
