"""
Predictions as JSON (masks as COCO RLE) and as a picture, with numpy and Pillow only, so that
both predictors write the same JSON and the ONNX Runtime one needs neither torch nor pycocotools.
"""

from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["class_names_of", "rle_encode", "instances_json", "draw_instances"]


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


def draw_instances(
    rgb: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    class_names: Sequence[str],
    masks: Optional[np.ndarray] = None,
    colors: Optional[List] = None,
) -> np.ndarray:
    """
    The image (RGB uint8) with each instance drawn as detectron2's Visualizer lays it out: the
    mask filled at half opacity in the class colour, the box outlined, and "name score%".
    """
    base = Image.fromarray(np.ascontiguousarray(rgb[:, :, :3]) if rgb.ndim == 3 else rgb)
    base = base.convert("RGB")
    overlay = np.asarray(base, dtype=np.float32).copy()
    for i in range(len(scores)):
        if masks is not None:
            color = np.array(_color(int(classes[i]), colors), dtype=np.float32)
            m = np.asarray(masks[i], dtype=bool)
            overlay[m] = overlay[m] * 0.5 + color * 0.5
    image = Image.fromarray(overlay.round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for i in range(len(scores)):
        cls = int(classes[i])
        color = _color(cls, colors)
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        draw.rectangle([x0, y0, x1, y1], outline=color, width=1)
        name = class_names[cls] if 0 <= cls < len(class_names) else str(cls)
        label, at = f"{name} {float(scores[i]) * 100:.0f}%", (x0 + 1, max(0.0, y0 - 11))
        draw.rectangle(draw.textbbox(at, label), fill=(0, 0, 0))
        draw.text(at, label, fill=color)
    return np.asarray(image)
