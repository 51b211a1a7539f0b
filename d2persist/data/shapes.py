"""
The built-in synthetic "shapes" dataset: circles, squares and triangles on varied backgrounds.

Images, boxes and polygon masks are generated deterministically from a seed, once, into a cache
folder, and registered in detectron2's ``DatasetCatalog``/``MetadataCatalog``. It lets the whole
product be trained, evaluated and tested on a CPU with no download.

The same images also serve every other task detectron2's models learn (:func:`register_shapes`
registers each, for each split):

=====================  =============================================  ========================
dataset                what each image carries                        detectron2's evaluator
=====================  =============================================  ========================
``shapes_*``           boxes, polygon masks                           COCOEvaluator
``shapes_kp_*``        boxes, masks, 4 keypoints per shape            COCOEvaluator (keypoints)
``shapes_sem_*``       ``sem_seg_file_name``: a PNG of class ids      SemSegEvaluator
``shapes_panoptic_*``  instances, stuff-vs-things PNG, COCO panoptic  COCOPanopticEvaluator
=====================  =============================================  ========================

Keypoints are the extreme points of each shape's polygon (``top``, ``right``, ``bottom``,
``left``; ties averaged), so a horizontal flip swaps ``left`` and ``right``. The semantic map
labels ``background`` 0 and each shape class ``1 + its thing id``. The panoptic annotations are in
COCO panoptic format (``panoptic.json`` and RGB-encoded segment PNGs) with the three shapes as
things and ``background`` as the one stuff class; the PanopticFPN semantic target is "separated"
as detectron2's COCO one is: 0 for things, 1 for ``background``.
"""

import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..files.atomic import write_bytes, write_json
from ..layout import cache_root

__all__ = [
    "SHAPE_CLASSES",
    "SHAPE_COLORS",
    "SHAPE_KEYPOINTS",
    "KEYPOINT_FLIP_MAP",
    "KEYPOINT_CONNECTION_RULES",
    "KEYPOINT_OKS_SIGMAS",
    "SEMANTIC_CLASSES",
    "BACKGROUND_COLOR",
    "DATASET_TASKS",
    "ShapesSpec",
    "default_cache_dir",
    "generate_shapes",
    "generate_labels",
    "label_folder",
    "shape_keypoints",
    "register_shapes",
]

logger = logging.getLogger(__name__)

#: Class names, in contiguous-id order.
SHAPE_CLASSES = ["circle", "square", "triangle"]
#: One RGB colour per class, for visualizations.
SHAPE_COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200)]

#: Keypoint names of every shape, with detectron2's flip map and skeleton.
SHAPE_KEYPOINTS = ["top", "right", "bottom", "left"]
KEYPOINT_FLIP_MAP = [("left", "right")]
KEYPOINT_CONNECTION_RULES = [("top", "right", (255, 255, 0)), ("right", "bottom", (0, 255, 255)),
                             ("bottom", "left", (255, 0, 255)), ("left", "top", (255, 128, 0))]
#: ``TEST.KEYPOINT_OKS_SIGMAS`` for the shapes keypoints (COCOEvaluator needs one per keypoint).
KEYPOINT_OKS_SIGMAS = [0.05, 0.05, 0.05, 0.05]
#: The semantic classes of ``shapes_sem_*``: background, then the shapes in thing-id order.
SEMANTIC_CLASSES = ["background"] + SHAPE_CLASSES
#: Colour of the stuff class ``background`` in pictures.
BACKGROUND_COLOR = (128, 128, 128)
_STUFF_DATASET_ID = len(SHAPE_CLASSES) + 1  # COCO panoptic category id of "background"
_LABEL_VERSION = 1  # of the semantic and panoptic files derived from the polygons

_INDEX = "index.json"
_FORMAT_VERSION = 2


class ShapesSpec:
    """
    What to generate: ``num_images`` images of ``size`` x ``size`` pixels from ``seed``.

    Two specs with the same fields give byte-identical images.
    """

    def __init__(self, num_images: int, size: int = 128, seed: int = 0,
                 max_shapes: int = 4) -> None:
        self.num_images = int(num_images)
        self.size = int(size)
        self.seed = int(seed)
        self.max_shapes = int(max_shapes)

    @property
    def key(self) -> str:
        """A folder name that identifies the spec."""
        return (
            f"v{_FORMAT_VERSION}-n{self.num_images}-s{self.size}-seed{self.seed}"
            f"-m{self.max_shapes}"
        )


def default_cache_dir() -> str:
    """d2persist's cache folder (:func:`d2persist.layout.cache_root`)."""
    return cache_root()


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


def generate_shapes(spec: ShapesSpec, cache_dir: Optional[str] = None) -> List[Dict[str, Any]]:
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


def shape_keypoints(polygon: Union[Sequence[float], np.ndarray]) -> List[float]:
    """
    The 4 keypoints of a shape (``SHAPE_KEYPOINTS`` order): the extreme points of its polygon,
    the points within 0.5 px of an extreme averaged (an edge gives its middle).

    Returns:
        list[float]: ``[x, y, 2] * 4`` (all visible), in detectron2's continuous coordinates.
    """
    poly = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    out = []
    for axis, sign in ((1, -1), (0, 1), (1, 1), (0, -1)):  # top, right, bottom, left
        v = poly[:, axis] * sign
        point = poly[v >= v.max() - 0.5].mean(axis=0)
        out += [round(float(point[0]), 2), round(float(point[1]), 2), 2]
    return out


def _label_maps(record):
    """(semantic ids, panoptic segment ids, segments_info) of one image's record."""
    import cv2

    h, w = record["height"], record["width"]
    sem = np.zeros((h, w), np.uint8)
    pan = np.zeros((h, w), np.int32)
    segments = []
    for k, anno in enumerate(record["annotations"], start=1):
        poly = np.round(np.asarray(anno["segmentation"][0]).reshape(-1, 2)).astype(np.int32)
        mask = np.zeros((h, w), np.uint8)
        cv2.fillPoly(mask, [poly], 1)
        sem[mask > 0] = 1 + anno["category_id"]
        pan[mask > 0] = k
        segments.append((k, anno["category_id"] + 1, True, mask > 0))
    stuff = pan == 0
    pan[stuff] = len(segments) + 1
    segments.append((len(segments) + 1, _STUFF_DATASET_ID, False, stuff))
    info = []
    for seg_id, cat, _isthing, mask in segments:
        ys, xs = np.nonzero(mask)
        if not len(xs):
            continue
        x0, y0 = int(xs.min()), int(ys.min())
        info.append({"id": seg_id, "category_id": cat, "iscrowd": 0, "area": int(mask.sum()),
                     "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]})
    return sem, pan, info


def _panoptic_categories():
    cats = [{"id": i + 1, "name": n, "isthing": 1, "color": list(SHAPE_COLORS[i])}
            for i, n in enumerate(SHAPE_CLASSES)]
    return cats + [{"id": _STUFF_DATASET_ID, "name": "background", "isthing": 0,
                    "color": list(BACKGROUND_COLOR)}]


def label_folder(spec: ShapesSpec, cache_dir: Optional[str] = None) -> str:
    """The folder of ``spec``'s semantic and panoptic label files (see :func:`generate_labels`)."""
    return os.path.join(cache_dir or default_cache_dir(), "shapes", spec.key,
                        f"labels-v{_LABEL_VERSION}")


def generate_labels(spec: ShapesSpec, cache_dir: Optional[str] = None
                    ) -> Tuple[List[Dict[str, Any]], str]:
    """
    Write, once, the semantic and panoptic labels of ``spec``'s images, derived from their
    polygons: ``sem/NNNNN.png`` (class ids, :data:`SEMANTIC_CLASSES`), ``pan_sem/NNNNN.png``
    (0 things, 1 background), ``panoptic/NNNNN.png`` (COCO panoptic RGB ids) and
    ``panoptic.json`` (COCO panoptic, written last: its presence says the folder is complete).

    Returns:
        tuple[list[dict], str]: the images' dataset dicts (:func:`generate_shapes`) and the
        label folder.
    """
    import cv2

    dicts = generate_shapes(spec, cache_dir)
    folder = label_folder(spec, cache_dir)
    done = os.path.join(folder, "panoptic.json")
    if os.path.isfile(done):
        return dicts, folder
    for sub in ("sem", "pan_sem", "panoptic"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    images, annotations = [], []
    for d in dicts:
        stem = os.path.splitext(os.path.basename(d["file_name"]))[0]
        sem, pan, info = _label_maps(d)
        pan_sem = np.where(sem > 0, 0, 1).astype(np.uint8)
        rgb = np.stack([pan % 256, pan // 256 % 256, pan // 65536], axis=-1).astype(np.uint8)
        for sub, array in (("sem", sem), ("pan_sem", pan_sem), ("panoptic", rgb[:, :, ::-1])):
            ok, buf = cv2.imencode(".png", array)
            assert ok, stem
            write_bytes(os.path.join(folder, sub, stem + ".png"), buf.tobytes())
        images.append({"id": d["image_id"], "file_name": os.path.basename(d["file_name"]),
                       "height": d["height"], "width": d["width"]})
        annotations.append({"image_id": d["image_id"], "file_name": stem + ".png",
                            "segments_info": info})
    write_json(done, {"images": images, "annotations": annotations,
                      "categories": _panoptic_categories()})
    return dicts, folder


def _keypoint_dicts(spec, cache_dir):
    out = []
    for d in generate_shapes(spec, cache_dir):
        annos = [dict(a, keypoints=shape_keypoints(a["segmentation"][0]))
                 for a in d["annotations"]]
        out.append(dict(d, annotations=annos))
    return out


def _semantic_dicts(spec, cache_dir):
    dicts, folder = generate_labels(spec, cache_dir)
    return [{"file_name": d["file_name"], "height": d["height"], "width": d["width"],
             "image_id": d["image_id"],
             "sem_seg_file_name": os.path.join(folder, "sem", _stem(d) + ".png")}
            for d in dicts]


def _panoptic_dicts(spec, cache_dir):
    dicts, folder = generate_labels(spec, cache_dir)
    with open(os.path.join(folder, "panoptic.json"), "r", encoding="utf-8") as f:
        segments = {a["image_id"]: a["segments_info"] for a in json.load(f)["annotations"]}
    things = {i + 1: i for i in range(len(SHAPE_CLASSES))}
    out = []
    for d in dicts:
        info = [dict(s, isthing=s["category_id"] in things,
                     category_id=things.get(s["category_id"], 1)) for s in segments[d["image_id"]]]
        out.append(dict(d, sem_seg_file_name=os.path.join(folder, "pan_sem", _stem(d) + ".png"),
                        pan_seg_file_name=os.path.join(folder, "panoptic", _stem(d) + ".png"),
                        segments_info=info))
    return out


def _stem(d):
    return os.path.splitext(os.path.basename(d["file_name"]))[0]


#: The tasks :func:`register_shapes` registers: name suffix of the datasets, and their loader.
DATASET_TASKS = {"instances": "", "keypoints": "_kp", "semantic": "_sem", "panoptic": "_panoptic"}


def _metadata(task, spec, cache_dir):
    colors = [list(c) for c in SHAPE_COLORS]
    base = {"thing_classes": list(SHAPE_CLASSES), "thing_colors": colors}
    if task == "instances":
        return dict(base, evaluator_type="coco")
    if task == "keypoints":
        return dict(base, evaluator_type="coco", keypoint_names=list(SHAPE_KEYPOINTS),
                    keypoint_flip_map=[list(p) for p in KEYPOINT_FLIP_MAP],
                    keypoint_connection_rules=[[a, b, list(c)]
                                               for a, b, c in KEYPOINT_CONNECTION_RULES])
    if task == "semantic":
        return {"stuff_classes": list(SEMANTIC_CLASSES),
                "stuff_colors": [list(BACKGROUND_COLOR)] + colors,
                "evaluator_type": "sem_seg", "ignore_label": 255}
    folder = label_folder(spec, cache_dir)
    return dict(
        base, evaluator_type="coco_panoptic_seg", ignore_label=255, label_divisor=1000,
        stuff_classes=["things", "background"],
        stuff_colors=[[82, 18, 128], list(BACKGROUND_COLOR)],
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(SHAPE_CLASSES))},
        # 0: the "things" class of the separated semantic target (as detectron2's COCO one)
        stuff_dataset_id_to_contiguous_id={0: 0, _STUFF_DATASET_ID: 1},
        panoptic_root=os.path.join(folder, "panoptic"),
        panoptic_json=os.path.join(folder, "panoptic.json"),
    )


_LOADERS = {"instances": generate_shapes, "keypoints": _keypoint_dicts,
            "semantic": _semantic_dicts, "panoptic": _panoptic_dicts}


#: the images of the quick val split ``{prefix}_val_10`` (the val split's first ones)
QUICK_VAL = 10


def register_shapes(
    prefix: str = "shapes",
    num_train: int = 200,
    num_val: int = 50,
    size: int = 128,
    seed: int = 0,
    cache_dir: Optional[str] = None,
) -> Tuple[str, str]:
    """
    Register ``{prefix}_train`` and ``{prefix}_val`` in detectron2's catalogs, and the same
    images for the other tasks: ``{prefix}_kp_*`` (keypoints), ``{prefix}_sem_*`` (semantic
    segmentation), ``{prefix}_panoptic_*`` (panoptic segmentation; see the module's docstring).

    Images are generated lazily, the first time a split is asked for. The val split uses a
    different seed, so its images are held out from training; ``{prefix}_val_10`` holds its
    first 10 images, for quick evaluations. Calling it again is a no-op.

    Returns:
        tuple[str, str]: the names of the train and val datasets of the instances task.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    specs = {"train": ShapesSpec(num_train, size, seed),
             "val": ShapesSpec(num_val, size, seed + 1_000_003),
             # the val split's first 10 images, for quick checks (as detectron2's
             # coco_2017_val_100 is COCO val's first 100)
             f"val_{QUICK_VAL}": ShapesSpec(min(QUICK_VAL, num_val), size, seed + 1_000_003)}
    for task, suffix in DATASET_TASKS.items():
        for split, spec in specs.items():
            name = f"{prefix}{suffix}_{split}"
            if name in DatasetCatalog.list():
                continue
            load = _LOADERS[task]
            DatasetCatalog.register(name, lambda spec=spec, load=load: load(spec, cache_dir))
            MetadataCatalog.get(name).set(**_metadata(task, spec, cache_dir))
    return f"{prefix}_train", f"{prefix}_val"


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
