"""
Score a predictor with the metric of its model's family, as detectron2's evaluators score it,
with numpy, pycocotools and (panoptic) panopticapi only (no torch, no detectron2): the ONNX
Runtime backend of a bundle can be evaluated where only it is installed.

- :func:`evaluate_coco`, as ``COCOEvaluator``: the predictions are turned into COCO results as
  ``instances_to_coco_json`` does (XYWH boxes in float32, masks as RLE, keypoints shifted by
  -0.5 px), a segm evaluation drops the boxes (so that small/medium/large are by mask area), a
  keypoint one uses the config's ``TEST.KEYPOINT_OKS_SIGMAS``, and the metrics are derived as
  ``COCOEvaluator._derive_coco_results`` derives them: percent, NaN where COCO gives -1, and
  ``AP-<class>`` per category.
- :func:`evaluate_sem_seg`, as ``SemSegEvaluator``: one confusion matrix over a folder of label
  PNGs; mIoU, fwIoU, mACC, pACC, per-class IoU and ACC (and boundary IoU where OpenCV is
  installed, as detectron2 does).
- :func:`evaluate_panoptic`, as ``COCOPanopticEvaluator``: PQ, SQ, RQ (all, things, stuff) by
  panopticapi's ``pq_compute`` on a COCO panoptic json and its PNGs.
"""

import contextlib
import io
import logging
import math
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ArtifactError, D2PersistError, DatasetMismatchError, InputImageError

if TYPE_CHECKING:
    from pycocotools.coco import COCO

__all__ = ["evaluate_coco", "check_coco_dataset", "coco_metrics", "match_categories",
           "format_results", "evaluate_sem_seg", "sem_seg_metrics", "evaluate_panoptic",
           "config_keypoint_sigmas", "keypoint_sigmas"]

logger = logging.getLogger(__name__)

_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
#: COCOEvaluator's keypoint metrics (COCO's keypoint summary has no APs).
_KEYPOINT_METRICS = ("AP", "AP50", "AP75", "APm", "APl")


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
    except AssertionError:  # pycocotools asserts that the file holds a mapping
        raise ArtifactError(
            f"{json_file} is not a COCO annotation file (a mapping with images, annotations "
            "and categories; a list is a results file).") from None
    except OSError as e:
        raise ArtifactError(f"Cannot read {json_file}: {e.strerror or e}.") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{json_file} is not a COCO annotation file ({e}).") from None


def _short_name(name: str) -> str:
    """A COCO panoptic category's name as detectron2's metadata gives it ("sky-other-merged":
    "sky"; ``detectron2/data/datasets/builtin_meta.py``)."""
    return name.replace("-other", "").replace("-merged", "")


def match_categories(categories: Sequence[dict], class_names: Sequence[str]) -> Dict[int, int]:
    """
    Class index of the bundle -> category id of the dataset, matched by name.

    Raises:
        DatasetMismatchError: a dataset category the bundle has no class of, in one sentence
            listing both.
    """
    by_name = {c["name"]: c["id"] for c in categories}
    unknown = [name for name in by_name if name not in class_names]
    if not by_name:
        raise DatasetMismatchError(
            f"The dataset has no categories to score the bundle's classes "
            f"({', '.join(class_names) or 'none'}) against.")
    if unknown:
        raise DatasetMismatchError(
            f"The dataset's categories ({', '.join(sorted(by_name))}) do not match the "
            f"bundle's classes ({', '.join(class_names) or 'none'}): "
            f"{', '.join(sorted(unknown))} not among them.")
    extra = [n for n in class_names if n not in by_name]
    if extra:
        logger.warning("The bundle's classes %s are not in the dataset: their predictions are "
                       "not scored.", ", ".join(extra))
    return {i: by_name[n] for i, n in enumerate(class_names) if n in by_name}


def _results(pred_json: dict, image_id: int, class_to_cat: Dict[int, int]) -> List[dict]:
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
        if "keypoints" in inst:  # COCO's are pixel indices: detectron2 shifts by -0.5
            item["keypoints"] = [float(np.float32(v) - np.float32(0.5)) if k < 2 else float(v)
                                 for kp in inst["keypoints"] for k, v in enumerate(kp)]
        out.append(item)
    return out


def coco_metrics(coco_gt: "COCO", results: List[dict], iou_type: str,
                 kpt_oks_sigmas: Sequence[float] = ()) -> Dict[str, float]:
    """
    COCOEvaluator's metrics of ``results`` (COCO result dicts) on ``coco_gt`` for ``iou_type``
    ("bbox", "segm" or "keypoints"): AP, AP50, AP75, APs (not for keypoints), APm, APl and
    AP-<category>, in percent.

    Args:
        kpt_oks_sigmas: keypoints: one OKS sigma per keypoint (COCO's 17 when empty).
    """
    from pycocotools.cocoeval import COCOeval

    names_of = _KEYPOINT_METRICS if iou_type == "keypoints" else _METRICS
    cats = sorted(coco_gt.getCatIds())
    names = [coco_gt.cats[c]["name"] for c in cats]
    if not results:  # pycocotools does not handle empty results
        return {m: float("nan") for m in names_of}
    if iou_type == "segm":  # mask area, not box area, decides small/medium/large
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        if iou_type == "keypoints":  # COCO's keypoint maxDets (20) stay, as detectron2 keeps them
            if kpt_oks_sigmas:
                ev.params.kpt_oks_sigmas = np.array(kpt_oks_sigmas)
        else:
            ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    logger.info("COCO %s evaluation:\n%s", iou_type, printed.getvalue().rstrip())
    out = {m: float(ev.stats[i] * 100 if ev.stats[i] >= 0 else "nan")
           for i, m in enumerate(names_of)}
    precisions = ev.eval["precision"]  # iou, recall, cls, area range, max dets
    for idx, name in enumerate(names):
        p = precisions[:, :, idx, 0, -1]
        p = p[p > -1]
        out["AP-" + name] = float(np.mean(p) * 100) if p.size else float("nan")
    return out


def config_keypoint_sigmas(path: str) -> List[float]:
    """
    The OKS sigmas of the artifacts at ``path`` (a bundle or a run folder): the yacs config's
    ``TEST.KEYPOINT_OKS_SIGMAS``, a LazyConfig's ``dataloader.evaluator.kpt_oks_sigmas``; []
    if it names none. Read with a safe YAML loader, without torch.
    """
    from ..artifacts.bundle import find_bundle
    from ..files.safe_load import safe_yaml_load
    from ..layout import CONFIG_NAME

    bundle = find_bundle(path) if os.path.isdir(path) else None
    for folder in (bundle, path):
        config = os.path.join(folder or "", CONFIG_NAME)
        if folder and os.path.isfile(config):
            return keypoint_sigmas(safe_yaml_load(config) or {})
    return []


def keypoint_sigmas(config: dict) -> List[float]:
    """
    The OKS sigmas a config (as read from YAML) names: a yacs config's
    ``TEST.KEYPOINT_OKS_SIGMAS``, a LazyConfig's ``dataloader.evaluator.kpt_oks_sigmas`` (of
    the first evaluator naming them where ``dataloader.evaluator`` is a list, as the zoo's
    panoptic data config has it); [] if it names none.
    """
    sigmas = (config.get("TEST") or {}).get("KEYPOINT_OKS_SIGMAS")
    if not sigmas:
        evaluator = (config.get("dataloader") or {}).get("evaluator") or {}
        sigmas = next((e["kpt_oks_sigmas"] for e in (
            evaluator if isinstance(evaluator, list) else [evaluator])
            if isinstance(e, dict) and e.get("kpt_oks_sigmas")), None)
    return [float(v) for v in sigmas or []]


def _progress(items, enabled):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="evaluate", unit="image")


def evaluate_coco(predictor: Any, coco_json: str, image_root: str = "",
                  progress: bool = False, kpt_oks_sigmas: Sequence[float] = (),
                  dataset: Optional[Tuple[Any, List[Tuple[int, str]]]] = None
                  ) -> Dict[str, Dict[str, float]]:
    """
    Predict every image of a COCO-format dataset and score it as COCOEvaluator does.

    Args:
        predictor: a predictor of :func:`d2persist.load_predictor` (either backend).
        coco_json (str): the dataset's annotations.
        image_root (str): folder the images' ``file_name`` are relative to.
        progress (bool): a progress bar on stderr (tqdm).
        kpt_oks_sigmas: keypoint models: one OKS sigma per keypoint
            (:func:`config_keypoint_sigmas`).
        dataset: what :func:`check_coco_dataset` returned for ``coco_json``, if it was
            already checked (not read again).

    Returns:
        dict: ``{"bbox": {"AP": ..., "AP-<class>": ...}, "segm": {...}, "keypoints": {...}}``
        (segm when the model predicts masks, keypoints when it predicts keypoints and the
        dataset has them), detectron2's results layout.

    Raises:
        DatasetMismatchError: the dataset's category names are not the bundle's class names.
        InputImageError: an image is missing or unreadable.
        D2PersistError: keypoints to score without a sigma for each.
    """
    coco, images = dataset or check_coco_dataset(coco_json, image_root)
    class_to_cat = match_categories(list(coco.cats.values()), list(predictor.class_names))
    results = []
    for image_id, path in _progress(images, progress):
        results += _results(predictor(path).to_json(), image_id, class_to_cat)
    tasks = ["bbox"] + (["segm"] if any("segmentation" in r for r in results) else [])
    truth = next((a["keypoints"] for a in coco.anns.values() if a.get("keypoints")), None)
    predicted = next((r["keypoints"] for r in results if "keypoints" in r), None)
    if truth is not None and predicted is not None:
        expected = len(kpt_oks_sigmas or ()) or 17  # COCOeval's own sigmas are COCO's 17
        counts = {"the model's": len(predicted) // 3, "the dataset's": len(truth) // 3}
        wrong = [f"{who} {n}" for who, n in counts.items() if n != expected]
        if wrong:
            raise D2PersistError(
                f"Keypoint AP needs one OKS sigma per keypoint: {expected} sigmas "
                f"(TEST.KEYPOINT_OKS_SIGMAS, or --keypoint-oks-sigmas) for "
                f"{' and '.join(wrong)} keypoints.")
        tasks.append("keypoints")
    return {task: coco_metrics(coco, results, task, kpt_oks_sigmas) for task in tasks}


def check_coco_dataset(coco_json: str, image_root: str = "") -> Tuple[Any, List[Tuple[int, str]]]:
    """
    A COCO dataset checked before any prediction: images listed, each with an id, a
    ``file_name`` and its file there, annotations of declared categories (else every metric
    would come out NaN, as if scored; annotations of undeclared ones beside them are warned
    about, and not scored, as by COCOEvaluator).

    Args:
        coco_json (str): the dataset's annotations.
        image_root (str): folder the images' ``file_name`` are relative to.

    Returns:
        tuple: ``(pycocotools COCO, [(image id, image path), ...])`` in id order.

    Raises:
        ArtifactError: not a COCO file, an image without ``file_name``, only annotations of
            undeclared categories.
        DatasetMismatchError: no images, or no annotations: nothing to score.
        InputImageError: an image file is missing.
    """
    coco = _coco(coco_json)
    if not coco.imgs:
        raise DatasetMismatchError(f"{coco_json} lists no images: there is nothing to score.")
    if not coco.anns:
        raise DatasetMismatchError(f"{coco_json} holds no annotations: every metric would be "
                                   "undefined.")
    undeclared = sorted({a.get("category_id") for a in coco.anns.values()} - set(coco.cats),
                        key=str)
    if undeclared and not any(a.get("category_id") in coco.cats for a in coco.anns.values()):
        raise ArtifactError(f"{coco_json} annotates only category ids its categories do not "
                            f"declare (such as {undeclared[0]!r}): there is nothing to score.")
    if undeclared:  # COCOeval leaves them out, as COCOEvaluator does
        logger.warning("%s annotates category id(s) %s, which its categories do not declare: "
                       "those annotations are not scored.", coco_json,
                       ", ".join(map(str, undeclared)))
    images = []
    for image_id in sorted(coco.imgs):
        name = coco.imgs[image_id].get("file_name")
        if not name:
            raise ArtifactError(f"{coco_json}: image {image_id} has no file_name.")
        images.append((image_id, _image_path(image_root, name, coco_json)))
    return coco, images


def _image_path(image_root, file_name, where):
    path = os.path.join(image_root, file_name)
    if not os.path.isfile(path):
        raise InputImageError(f"Image {path} of {where} does not exist (is --image-root "
                              "the folder its file_name values are relative to?).")
    return path


def _label_files(label_dir, image_root):
    """(image, label PNG) pairs: each PNG of ``label_dir`` with the image of its stem."""
    if not os.path.isdir(label_dir):
        raise ArtifactError(f"Label folder {label_dir} does not exist.")
    images = {}
    root = image_root or "."
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else ():
        images.setdefault(os.path.splitext(name)[0], os.path.join(image_root, name))
    pairs = []
    for name in sorted(os.listdir(label_dir)):
        stem, ext = os.path.splitext(name)
        if ext.lower() != ".png":
            continue
        if stem not in images:
            raise InputImageError(f"Label {name} of {label_dir} has no image named {stem}.* in "
                                  f"{image_root or 'the current folder'}.")
        pairs.append((images[stem], os.path.join(label_dir, name)))
    if not pairs:
        raise ArtifactError(f"Label folder {label_dir} holds no PNG.")
    return pairs


def _boundary(mask, dilation_ratio=0.02):
    """detectron2's ``SemSegEvaluator._mask_to_boundary`` (needs OpenCV)."""
    import cv2

    h, w = mask.shape
    dilation = max(1, int(round(dilation_ratio * np.sqrt(h ** 2 + w ** 2))))
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), dtype=np.uint8), iterations=dilation)
    return mask - eroded[1: h + 1, 1: w + 1]


def sem_seg_metrics(conf: np.ndarray, class_names: Sequence[str],
                    boundary: Optional[np.ndarray] = None) -> Dict[str, float]:
    """
    SemSegEvaluator's metrics of a (C+1) x (C+1) confusion matrix (rows: prediction, columns:
    ground truth, the last one ignored pixels), in percent.
    """
    n = len(class_names)
    acc = np.full(n, np.nan)
    iou = np.full(n, np.nan)
    tp: np.ndarray = conf.diagonal()[:-1].astype(float)
    pos_gt = conf[:-1, :-1].sum(axis=0).astype(float)
    pos_pred = conf[:-1, :-1].sum(axis=1).astype(float)
    weights = pos_gt / pos_gt.sum()
    acc_valid = pos_gt > 0
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    union = pos_gt + pos_pred - tp
    iou_valid = acc_valid & (union > 0)
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    b_iou = None
    if boundary is not None:
        b_iou = np.full(n, np.nan)
        b_tp: np.ndarray = boundary.diagonal()[:-1].astype(float)
        b_union = boundary[:-1, :-1].sum(axis=0) + boundary[:-1, :-1].sum(axis=1) - b_tp
        b_iou[b_union > 0] = b_tp[b_union > 0] / b_union[b_union > 0]
    res: Dict[str, Any] = {"mIoU": 100 * np.sum(iou[iou_valid]) / np.sum(iou_valid),
                           "fwIoU": 100 * np.sum(iou[iou_valid] * weights[iou_valid])}
    for i, name in enumerate(class_names):
        res[f"IoU-{name}"] = 100 * iou[i]
        if b_iou is not None:
            res[f"BoundaryIoU-{name}"] = 100 * b_iou[i]
            res[f"min(IoU, B-Iou)-{name}"] = 100 * min(iou[i], b_iou[i])
    res["mACC"] = 100 * np.sum(acc[acc_valid]) / np.sum(acc_valid)
    res["pACC"] = 100 * np.sum(tp) / np.sum(pos_gt)
    for i, name in enumerate(class_names):
        res[f"ACC-{name}"] = 100 * acc[i]
    return {k: float(v) for k, v in res.items()}


def evaluate_sem_seg(predictor: Any, label_dir: str, image_root: str = "",
                     ignore_label: Optional[int] = None,
                     progress: bool = False) -> Dict[str, Dict[str, float]]:
    """
    Predict the image of each label PNG in ``label_dir`` (the image of the same stem in
    ``image_root``) and score it as SemSegEvaluator does. The labels are class ids in the
    bundle's ``stuff_classes`` order, ``ignore_label`` (default: the metadata's, else 255) not
    scored.

    Returns:
        dict: ``{"sem_seg": {"mIoU", "fwIoU", "IoU-<class>", "mACC", "pACC", ...}}``.
    """
    from PIL import Image

    names = list(predictor.metadata.get("stuff_classes") or [])
    if not names:
        raise DatasetMismatchError("The bundle's metadata names no stuff_classes: it has no "
                                   "semantic segmentation to score.")
    try:
        import cv2  # noqa: F401  (boundary IoU, as detectron2 computes it where it can)
        with_boundary = len(names) < 255
    except ImportError:
        with_boundary = False
    if ignore_label is None:
        ignore_label = int(predictor.metadata.get("ignore_label", 255))
    n = len(names)
    conf: np.ndarray = np.zeros((n + 1, n + 1), dtype=np.int64)
    b_conf = np.zeros_like(conf)
    for image, label in _progress(_label_files(label_dir, image_root), progress):
        pred = predictor(image).arrays.sem_seg
        if pred is None:
            raise DatasetMismatchError("The model predicts no semantic segmentation.")
        try:
            with Image.open(label) as png:
                gt = np.array(png, dtype=int)
        except (OSError, SyntaxError, ValueError) as e:  # (PIL's UnidentifiedImageError too)
            raise InputImageError(f"Label {label} is not a PNG that reads ({e}).") from None
        if gt.ndim != 2:
            raise DatasetMismatchError(f"Label {label} has {gt.shape[2]} channels; a semantic "
                                       "label PNG holds one class id a pixel.")
        if int(pred.max()) >= n:
            raise DatasetMismatchError(f"The model predicts class id {int(pred.max())}; the "
                                       f"bundle's metadata names {n} stuff_classes.")
        if gt.shape != pred.shape:
            raise DatasetMismatchError(f"Label {label} is {gt.shape[1]}x{gt.shape[0]} pixels, "
                                       f"its image {pred.shape[1]}x{pred.shape[0]}.")
        gt[gt == ignore_label] = n
        if gt.max() > n:
            raise DatasetMismatchError(f"Label {label} holds class id {int(gt.max())}; the "
                                       f"bundle has {n} classes ({', '.join(names)}).")
        pred = pred.astype(int)
        conf += np.bincount((n + 1) * pred.ravel() + gt.ravel(),
                            minlength=conf.size).reshape(conf.shape)
        if with_boundary:
            b_gt, b_pred = _boundary(gt.astype(np.uint8)), _boundary(pred.astype(np.uint8))
            b_conf += np.bincount((n + 1) * b_pred.ravel() + b_gt.ravel(),
                                  minlength=conf.size).reshape(conf.shape)
    return {"sem_seg": sem_seg_metrics(conf, names, b_conf if with_boundary else None)}


def evaluate_panoptic(predictor: Any, panoptic_json: str, panoptic_root: str, image_root: str = "",
                      progress: bool = False) -> Dict[str, Dict[str, float]]:
    """
    Predict every image of a COCO panoptic dataset and score it as COCOPanopticEvaluator does
    (panopticapi's ``pq_compute``). The dataset's categories are matched by name: things to
    the bundle's ``thing_classes``, stuff to its ``stuff_classes``.

    Returns:
        dict: ``{"panoptic_seg": {"PQ", "SQ", "RQ", "PQ_th", ..., "RQ_st"}}`` in percent.
    """
    import json
    import tempfile

    from PIL import Image

    try:
        from panopticapi.evaluation import pq_compute
    except ImportError:
        raise D2PersistError("Panoptic quality needs panopticapi (not on PyPI: install it from "
                             "its repository, github.com/cocodataset/panopticapi).") from None
    if not os.path.isfile(panoptic_json):
        raise ArtifactError(f"COCO panoptic file {panoptic_json} does not exist.")
    if not os.path.isdir(panoptic_root):
        raise ArtifactError(f"Panoptic PNG folder {panoptic_root} does not exist.")
    try:
        with open(panoptic_json, "r", encoding="utf-8") as f:
            gt = json.load(f)
        cats, images = gt["categories"], gt["images"]
        missing = next((k for k in ("annotations",) if k not in gt), None) or next(
            (f"'{k}' of image {i}" for i, info in enumerate(images) for k in ("id", "file_name")
             if k not in info), None)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{panoptic_json} is not a COCO panoptic file ({e}).") from None
    if missing:
        raise ArtifactError(f"{panoptic_json} is not a COCO panoptic file (no {missing}).")
    if not images:
        raise DatasetMismatchError(f"{panoptic_json} lists no images: there is nothing to "
                                   "score.")
    paths = [_image_path(image_root, info["file_name"], panoptic_json) for info in images]
    meta = predictor.metadata
    ids = {}
    for isthing, key in ((True, "thing_classes"), (False, "stuff_classes")):
        by_name: Dict[str, int] = {}
        for c in cats:
            if bool(c.get("isthing")) == isthing:
                by_name[c["name"]] = c["id"]
                by_name.setdefault(_short_name(c["name"]), c["id"])  # as detectron2 names it
        ids[isthing] = {i: by_name[n] for i, n in enumerate(meta.get(key) or []) if n in by_name}
    predictions = []
    with tempfile.TemporaryDirectory(prefix="d2persist-pq-") as pred_dir:
        for info, path in _progress(list(zip(images, paths)), progress):
            a = predictor(path).arrays
            if a.panoptic is None:
                raise DatasetMismatchError("The model predicts no panoptic segmentation.")
            segments = []
            for s in a.segments_info:
                cat = ids[bool(s["isthing"])].get(int(s["category_id"]))
                if cat is None:
                    raise DatasetMismatchError(
                        f"The dataset has no {'thing' if s['isthing'] else 'stuff'} category "
                        f"for the bundle's class {s['category_id']}.")
                segments.append({"id": int(s["id"]), "category_id": cat})
            png = os.path.splitext(info["file_name"])[0] + ".png"
            seg = a.panoptic.astype(np.uint32)
            rgb = np.stack([seg % 256, seg // 256 % 256, seg // 65536], axis=-1).astype(np.uint8)
            Image.fromarray(rgb).save(os.path.join(pred_dir, os.path.basename(png)))
            predictions.append({"image_id": info["id"], "file_name": os.path.basename(png),
                                "segments_info": segments})
        pred_json = os.path.join(pred_dir, "predictions.json")
        with open(pred_json, "w", encoding="utf-8") as f:
            json.dump(dict(gt, annotations=predictions), f)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                pq = pq_compute(panoptic_json, pred_json, gt_folder=panoptic_root,
                                pred_folder=pred_dir)
        except Exception as e:  # panopticapi raises plain Exceptions and KeyErrors for bad data
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ArtifactError(f"panopticapi could not score {panoptic_json} against "
                                f"{panoptic_root} ({type(e).__name__}: {first}).") from None
    out = {}
    for key, part in (("", "All"), ("_th", "Things"), ("_st", "Stuff")):
        for m in ("pq", "sq", "rq"):
            out[m.upper() + key] = 100 * float(pq[part][m])
    return {"panoptic_seg": out}


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
    """The tables detectron2's evaluators log: the summary and the per-category AP or IoU."""
    out = []
    for task, metrics in results.items():
        out.append(f"Evaluation results for {task}" + (f" on {name}" if name else "") + ":")
        if task in ("sem_seg", "panoptic_seg"):
            heads: Sequence[str] = [k for k in metrics if "-" not in k]
            out.append(_table(heads, [[metrics[k] for k in heads]]))
            per_class = [(k[4:], v) for k, v in metrics.items() if k.startswith("IoU-")]
            if per_class:
                out.append("Per-class IoU:")
                out.append(_table([n for n, _ in per_class], [[v for _, v in per_class]]))
            continue
        heads = _KEYPOINT_METRICS if task == "keypoints" else _METRICS
        out.append(_table(heads, [[metrics.get(m, float("nan")) for m in heads]]))
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
