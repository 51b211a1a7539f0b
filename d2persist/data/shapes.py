"""
The built-in synthetic "shapes" dataset: circles, squares and triangles on varied backgrounds.

Images, boxes and polygon masks are generated deterministically from a seed, once, into a cache
folder, and registered in detectron2's ``DatasetCatalog``/``MetadataCatalog``. It lets the whole
product be trained, evaluated and tested on a CPU with no download.
"""

import json
import logging
import os

import numpy as np

from ..fileio import write_bytes, write_json

__all__ = [
    "SHAPE_CLASSES",
    "SHAPE_COLORS",
    "ShapesSpec",
    "default_cache_dir",
    "generate_shapes",
    "register_shapes",
]

logger = logging.getLogger(__name__)

#: Class names, in contiguous-id order.
SHAPE_CLASSES = ["circle", "square", "triangle"]
#: One RGB colour per class, for visualizations.
SHAPE_COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200)]

_INDEX = "index.json"
_FORMAT_VERSION = 2


class ShapesSpec:
    """
    What to generate: ``num_images`` images of ``size`` x ``size`` pixels from ``seed``.

    Two specs with the same fields give byte-identical images.
    """

    def __init__(self, num_images, size=128, seed=0, max_shapes=4):
        self.num_images = int(num_images)
        self.size = int(size)
        self.seed = int(seed)
        self.max_shapes = int(max_shapes)

    @property
    def key(self):
        """A folder name that identifies the spec."""
        return (
            f"v{_FORMAT_VERSION}-n{self.num_images}-s{self.size}-seed{self.seed}"
            f"-m{self.max_shapes}"
        )


def default_cache_dir():
    """``$D2PERSIST_CACHE`` if set, else ``~/.cache/d2persist``."""
    return os.environ.get(
        "D2PERSIST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "d2persist")
    )


def _background(rng, size):
    """A random background: a two-colour gradient with mild noise."""
    c0, c1 = rng.integers(0, 256, size=(2, 3))
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    if rng.random() < 0.5:
        t = t[:, None, None] * np.ones((1, size, 1), np.float32)
    else:
        t = t[None, :, None] * np.ones((size, 1, 1), np.float32)
    img = c0[None, None, :] * (1 - t) + c1[None, None, :] * t
    img += rng.normal(0, 6, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _contrasting_color(rng, background):
    """A random colour that stands out from ``background`` (L1 distance of at least 200)."""
    for _ in range(50):
        color = rng.integers(0, 256, size=3)
        if np.abs(color.astype(int) - background.astype(int)).sum() >= 200:
            break
    return tuple(int(c) for c in color)


def _shape_polygon(rng, cls, cx, cy, r):
    """
    Polygon (N x 2 float array) of a shape of class ``cls`` centred at (cx, cy), as in the
    classic "shapes" toy dataset: circles, axis-aligned squares, upright triangles.
    """
    if cls == 0:  # circle
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    elif cls == 1:  # square
        t = np.pi / 4 + np.arange(4) * np.pi / 2
        r = r * np.sqrt(2) * 0.85
    else:  # triangle, pointing up
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _render(spec, index):
    """Render image ``index`` of ``spec``. Returns (BGR uint8 image, list of annotations)."""
    import cv2

    rng = np.random.default_rng([spec.seed, index])
    size = spec.size
    img = _background(rng, size)
    boxes, annos = [], []
    for _ in range(int(rng.integers(1, spec.max_shapes + 1))):
        for _attempt in range(20):
            r = rng.uniform(0.1, 0.22) * size
            cx, cy = rng.uniform(r + 2, size - r - 2, size=2)
            box = (cx - r * 1.2, cy - r * 1.2, cx + r * 1.2, cy + r * 1.2)
            if all(
                box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes
            ):
                break
        else:
            continue
        boxes.append(box)
        cls = int(rng.integers(0, len(SHAPE_CLASSES)))
        poly = _shape_polygon(rng, cls, cx, cy, r)
        color = _contrasting_color(rng, img[int(cy), int(cx)])
        cv2.fillPoly(img, [np.round(poly).astype(np.int32)], color, lineType=cv2.LINE_AA)
        x0, y0 = poly.min(axis=0)
        x1, y1 = poly.max(axis=0)
        annos.append(
            {
                "bbox": [float(x0), float(y0), float(x1), float(y1)],
                "bbox_mode": 0,  # BoxMode.XYXY_ABS
                "segmentation": [poly.reshape(-1).round(2).tolist()],
                "category_id": cls,
                "iscrowd": 0,
            }
        )
    return img, annos


def generate_shapes(spec, cache_dir=None):
    """
    Generate the images of ``spec`` into ``cache_dir`` once, and return their dataset dicts.

    The index is written last, so an interrupted generation is redone on the next call.

    Args:
        spec (ShapesSpec): what to generate.
        cache_dir (str): the cache root; :func:`default_cache_dir` if None.

    Returns:
        list[dict]: detectron2 dataset dicts (``file_name``, ``height``, ``width``, ``image_id``,
        ``annotations`` with XYXY_ABS boxes and polygon masks).
    """
    import cv2

    folder = os.path.join(cache_dir or default_cache_dir(), "shapes", spec.key)
    index_path = os.path.join(folder, _INDEX)
    if os.path.isfile(index_path):
        with open(index_path, "r", encoding="utf-8") as f:
            records = json.load(f)
    else:
        os.makedirs(folder, exist_ok=True)
        logger.info("Generating %d shapes images into %s", spec.num_images, folder)
        records = []
        for i in range(spec.num_images):
            img, annos = _render(spec, i)
            name = f"{i:05d}.png"
            ok, buf = cv2.imencode(".png", img)
            assert ok, name
            write_bytes(os.path.join(folder, name), buf.tobytes())
            records.append(
                {"file_name": name, "height": spec.size, "width": spec.size, "annotations": annos}
            )
        write_json(index_path, records)
    dicts = []
    for i, r in enumerate(records):
        d = dict(r, image_id=i, file_name=os.path.join(folder, r["file_name"]))
        dicts.append(d)
    return dicts


def register_shapes(
    prefix="shapes", num_train=200, num_val=50, size=128, seed=0, cache_dir=None
):
    """
    Register ``{prefix}_train`` and ``{prefix}_val`` in detectron2's catalogs.

    Images are generated lazily, the first time a split is asked for. The val split uses a
    different seed, so its images are held out from training. Calling it again is a no-op.

    Returns:
        tuple[str, str]: the names of the train and val datasets.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    names = (f"{prefix}_train", f"{prefix}_val")
    specs = (ShapesSpec(num_train, size, seed), ShapesSpec(num_val, size, seed + 1_000_003))
    for name, spec in zip(names, specs):
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda spec=spec: generate_shapes(spec, cache_dir))
        MetadataCatalog.get(name).set(
            thing_classes=list(SHAPE_CLASSES),
            thing_colors=[list(c) for c in SHAPE_COLORS],
            evaluator_type="coco",
        )
    return names


def _main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m d2persist.data.shapes",
                                     description="The built-in synthetic shapes dataset.")
    parser.add_argument("--held-out-image", action="store_true",
                        help="print the path of an image of the val split")
    args = parser.parse_args(argv)
    if args.held_out_image:
        from detectron2.data import DatasetCatalog

        _, val = register_shapes()
        print(DatasetCatalog.get(val)[0]["file_name"])


if __name__ == "__main__":
    _main()
