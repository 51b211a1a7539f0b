"""
Score a predictor on any COCO-format dataset, as detectron2's ``COCOEvaluator`` scores it,
with numpy and pycocotools only (no torch, no detectron2): the ONNX Runtime backend of a bundle
can be evaluated where only it is installed.

The predictions are turned into COCO results as ``instances_to_coco_json`` does (XYWH boxes in
float32, masks as RLE), a segm evaluation drops the boxes (so that small/medium/large are by
mask area), and the metrics are derived as ``COCOEvaluator._derive_coco_results`` derives them:
percent, NaN where COCO gives -1, and ``AP-<class>`` per category.
"""

import contextlib
import io
import logging
import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from .errors import ArtifactError, D2PersistError, InputImageError

__all__ = ["DatasetMismatchError", "evaluate_coco", "coco_metrics", "match_categories",
           "format_results"]

logger = logging.getLogger(__name__)

_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class DatasetMismatchError(D2PersistError):
    """The dataset's categories are not the bundle's classes."""


def _coco(json_file):
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise D2PersistError("Evaluation needs pycocotools (pip install pycocotools).") from None
    if not os.path.isfile(json_file):
        raise ArtifactError(f"COCO annotation file {json_file} does not exist.")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(json_file)
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{json_file} is not a COCO annotation file ({e}).") from None


def match_categories(categories: Sequence[dict], class_names: Sequence[str]) -> Dict[int, int]:
    """
    Class index of the bundle -> category id of the dataset, matched by name.

    Raises:
        DatasetMismatchError: a dataset category the bundle has no class of, in one sentence
            listing both.
    """
    by_name = {c["name"]: c["id"] for c in categories}
    unknown = [name for name in by_name if name not in class_names]
    if unknown or not by_name:
        raise DatasetMismatchError(
            f"The dataset's categories ({', '.join(sorted(by_name)) or 'none'}) do not match the "
            f"bundle's classes ({', '.join(class_names) or 'none'}): "
            f"{', '.join(sorted(unknown)) or 'nothing'} not among them.")
    extra = [n for n in class_names if n not in by_name]
    if extra:
        logger.warning("The bundle's classes %s are not in the dataset: their predictions are "
                       "not scored.", ", ".join(extra))
    return {i: by_name[n] for i, n in enumerate(class_names) if n in by_name}


def _results(pred_json: dict, image_id, class_to_cat: Dict[int, int]) -> List[dict]:
    """COCO results of one image's prediction JSON, as ``instances_to_coco_json`` gives them."""
    out = []
    for inst in pred_json["instances"]:
        cat = class_to_cat.get(int(inst["category_id"]))
        if cat is None:
            continue
        x0, y0, x1, y1 = (np.float32(v) for v in inst["bbox"])
        item = {"image_id": image_id, "category_id": cat,
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "score": float(np.float32(inst["score"]))}
        if "segmentation" in inst:
            item["segmentation"] = inst["segmentation"]
        out.append(item)
    return out


def coco_metrics(coco_gt, results: List[dict], iou_type: str) -> Dict[str, float]:
    """
    COCOEvaluator's metrics of ``results`` (COCO result dicts) on ``coco_gt`` for ``iou_type``
    ("bbox" or "segm"): AP, AP50, AP75, APs, APm, APl and AP-<category>, in percent.
    """
    from pycocotools.cocoeval import COCOeval

    cats = sorted(coco_gt.getCatIds())
    names = [coco_gt.cats[c]["name"] for c in cats]
    if not results:  # pycocotools does not handle empty results
        return {m: float("nan") for m in _METRICS}
    if iou_type == "segm":  # mask area, not box area, decides small/medium/large
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    logger.info("COCO %s evaluation:\n%s", iou_type, printed.getvalue().rstrip())
    out = {m: float(ev.stats[i] * 100 if ev.stats[i] >= 0 else "nan")
           for i, m in enumerate(_METRICS)}
    precisions = ev.eval["precision"]  # iou, recall, cls, area range, max dets
    for idx, name in enumerate(names):
        p = precisions[:, :, idx, 0, -1]
        p = p[p > -1]
        out["AP-" + name] = float(np.mean(p) * 100) if p.size else float("nan")
    return out


def _progress(items, enabled):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="evaluate", unit="image")


def evaluate_coco(predictor, coco_json: str, image_root: str = "",
                  progress: bool = False) -> Dict[str, Dict[str, float]]:
    """
    Predict every image of a COCO-format dataset and score it as COCOEvaluator does.

    Args:
        predictor: a predictor of :func:`d2persist.load_predictor` (either backend).
        coco_json (str): the dataset's annotations.
        image_root (str): folder the images' ``file_name`` are relative to.
        progress (bool): a progress bar on stderr (tqdm).

    Returns:
        dict: ``{"bbox": {"AP": ..., "AP-<class>": ...}, "segm": {...}}`` (segm when the model
        predicts masks), detectron2's results layout.

    Raises:
        DatasetMismatchError: the dataset's category names are not the bundle's class names.
        InputImageError: an image is missing or unreadable.
    """
    coco = _coco(coco_json)
    class_to_cat = match_categories(list(coco.cats.values()), list(predictor.class_names))
    results = []
    for image_id in _progress(sorted(coco.imgs), progress):
        info = coco.imgs[image_id]
        path = os.path.join(image_root, info["file_name"])
        if not os.path.isfile(path):
            raise InputImageError(f"Image {path} of {coco_json} does not exist (is --image-root "
                                  "the folder its file_name values are relative to?).")
        results += _results(predictor(path).to_json(), image_id, class_to_cat)
    tasks = ["bbox"] + (["segm"] if any("segmentation" in r for r in results) else [])
    return {task: coco_metrics(coco, results, task) for task in tasks}


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [[str(h) for h in header]] + [
        ["nan" if isinstance(v, float) and math.isnan(v) else
         f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.center(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join(":" + "-" * w + ":" for w in widths) + "|"]
    lines += ["| " + " | ".join(c.center(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    return "\n".join(lines)


def format_results(results: Dict[str, Dict[str, float]], name: Optional[str] = None) -> str:
    """The tables detectron2's COCOEvaluator logs: the summary and the per-category AP."""
    out = []
    for task, metrics in results.items():
        out.append(f"Evaluation results for {task}" + (f" on {name}" if name else "") + ":")
        out.append(_table(_METRICS, [[metrics.get(m, float("nan")) for m in _METRICS]]))
        per_cat = [(k[3:], v) for k, v in metrics.items() if k.startswith("AP-")]
        if per_cat:
            out.append(f"Per-category {task} AP:")
            cols = 3
            flat = [x for pair in per_cat for x in pair]
            flat += [""] * (-len(flat) % (2 * cols))
            rows = [flat[i:i + 2 * cols] for i in range(0, len(flat), 2 * cols)]
            out.append(_table(["category", "AP"] * min(cols, len(per_cat)),
                              [r[:2 * min(cols, len(per_cat))] for r in rows]))
    return "\n".join(out)
