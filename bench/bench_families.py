#!/usr/bin/env python
"""
Every model family (tests/helpers.py's FAMILIES: detectron2's zoo configs made tiny, trained
from scratch on the shapes task data), measured side by side in one run (sides alternate,
medians):

1. per image over the val split: the ONNX Runtime predictor (float, and INT8 where its export
   succeeds) vs d2persist's PyTorch predictor (the evaluation path), same images, same threads;
2. parity of ONNX Runtime with PyTorch over those images: the largest box, score and keypoint
   differences and the share of semantic / panoptic pixels that agree;
3. the export's self-evaluation (every backend, the family's metric) vs the training time.
"""

import json
import os
import pathlib
import tempfile
import time

import numpy as np
from common import alternate, machine, median, parse_args, per_image_timer, table

ITERATIONS = 40  # enough that every family predicts something above its thresholds


def _diffs(ref, got):
    """
    Largest differences of two PredictionArrays: each detection of ``ref`` against the one of
    ``got`` of its class nearest to it (detections tied in score may come in another order).
    """
    out = {}
    if ref.boxes is not None and len(ref.boxes) and len(got.boxes):
        box = score = keypoint = 0.0
        # detections tied with the lowest kept score may trade places with ones just below the
        # per-image limit (an untrained RetinaNet scores many anchors alike): not compared
        above = np.flatnonzero(ref.scores > ref.scores.min() + 1e-3)
        out["tied_at_limit"] = len(ref.boxes) - len(above)
        for i in above:
            same = np.flatnonzero(got.classes == ref.classes[i])
            if not len(same):
                out["unmatched"] = out.get("unmatched", 0) + 1
                continue
            d = np.abs(got.boxes[same] - ref.boxes[i]).max(axis=1)
            j = same[int(np.argmin(d))]
            box = max(box, float(d.min()))
            score = max(score, float(abs(got.scores[j] - ref.scores[i])))
            if ref.keypoints is not None:
                keypoint = max(keypoint, float(np.abs(got.keypoints[j, :, :2]
                                                      - ref.keypoints[i, :, :2]).max()))
        out.update(box=box, score=score)
        if ref.keypoints is not None:
            out["keypoint"] = keypoint
    if ref.boxes is not None and len(ref.boxes) != len(got.boxes):
        out["count"] = (len(ref.boxes), len(got.boxes))
    for key in ("sem_seg", "panoptic"):
        if getattr(ref, key) is not None:
            out[key] = float((getattr(ref, key) == getattr(got, key)).mean())
    if ref.proposals is not None and len(ref.proposals) == len(got.proposals):
        out["box"] = float(np.abs(ref.proposals - got.proposals).max())
    return out


def measure(name, folder, images, repeats):
    """Train family ``name`` into ``folder``, export it, and measure its predictors on
    ``images``: a dict of the figures the tables print."""
    from helpers import FAMILIES, family_cfg, family_trainer, train

    from d2persist import load_predictor

    cfg = family_cfg(name, folder)
    cfg.merge_from_list(["SOLVER.MAX_ITER", ITERATIONS, "SOLVER.CHECKPOINT_PERIOD", ITERATIONS,
                         "PERSIST.EXPORT_FORMATS", ["safetensors", "onnx", "onnx-int8"],
                         "PERSIST.CALIBRATION_IMAGES", 16])
    start = time.perf_counter()
    train(cfg, trainer_cls=family_trainer())
    wall = time.perf_counter() - start
    manifest = json.loads((folder / "export" / "manifest.json").read_text())
    predictors = {"pytorch": load_predictor(str(folder))}
    if "model.onnx" in manifest["files"]:
        predictors["onnxruntime"] = load_predictor(str(folder), backend="onnxruntime")
    if "model.int8.onnx" in manifest["files"]:
        predictors["int8"] = load_predictor(str(folder), precision="int8")
    times = alternate({k: per_image_timer(p, images) for k, p in predictors.items()}, repeats)
    worst = {}
    for image in images:
        if "onnxruntime" not in predictors:
            break
        for k, v in _diffs(predictors["pytorch"](image).arrays,
                           predictors["onnxruntime"](image).arrays).items():
            if k in ("count", "unmatched", "tied_at_limit"):  # numbers of detections
                worst[k] = max(worst.get(k, v), v)
            elif k in ("sem_seg", "panoptic"):  # the least agreement
                worst[k] = min(worst.get(k, 1.0), v)
            else:  # the largest difference
                worst[k] = max(worst.get(k, 0.0), v)
    evaluation = manifest.get("evaluation") or {}
    return {
        "task": manifest.get("onnx", {}).get("task", manifest.get("onnx", {}).get("error")),
        "int8": manifest.get("onnx_int8", {}).get("error", "ok"),
        "ms": {k: 1000 * median(v) for k, v in times.items()},
        "parity": worst,
        "eval_s": sum((evaluation.get("seconds") or {}).values()),
        "eval_backends": evaluation.get("backends") or {},
        "eval_failed": evaluation.get("failed"),
        "train_s": wall,
        "family": FAMILIES[name][0],
    }


def main():
    args = parse_args(__doc__, repeats=5)
    import torch
    from detectron2.data import DatasetCatalog
    from helpers import FAMILIES, PREFIX

    from d2persist.data.shapes import register_shapes

    register_shapes(PREFIX, num_val=10)
    images = [d["file_name"] for d in DatasetCatalog.get(f"{PREFIX}_val")]
    if args.quick:
        images = images[:5]
    print(f"{machine()}; {time.strftime('%Y-%m-%d %H:%M')}; torch threads "
          f"{torch.get_num_threads()}; {len(images)} images, {args.repeats} alternating repeats; "
          f"{ITERATIONS} iterations per family")
    results = {}
    with tempfile.TemporaryDirectory(prefix="d2persist-bench-families-") as tmp:
        for name in FAMILIES:
            folder = os.path.join(tmp, name)
            os.makedirs(folder)
            results[name] = measure(name, pathlib.Path(folder), images, args.repeats)
    rows = []
    for name, r in results.items():
        ms = r["ms"]
        rows.append((name, r["task"], f"{ms['pytorch']:.1f}",
                     f"{ms.get('onnxruntime', float('nan')):.1f} "
                     f"({ms.get('onnxruntime', float('nan')) / ms['pytorch']:.2f}x)",
                     f"{ms['int8']:.1f} ({ms['int8'] / ms['pytorch']:.2f}x)" if "int8" in ms
                     else r["int8"][:60]))
    table("per image, ms (median): PyTorch path, ONNX Runtime (ratio), INT8 (ratio)", rows,
          ("family", "onnx task", "pytorch", "onnxruntime", "int8"))
    rows = [(name, ", ".join(f"{k} {v:.2g}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in r["parity"].items())) for name, r in results.items()]
    table("ONNX Runtime vs PyTorch, worst over the images", rows, ("family", "parity"))
    rows = []
    for name, r in results.items():
        backends = r["eval_backends"]
        shown = ", ".join(f"{k} {v:.1f}" for k, v in (backends.get("pytorch") or {}).items()
                          if k.endswith(("/AP", "/mIoU", "/PQ")) and v is not None)
        rows.append((name, f"{r['eval_s']:.1f} s / {r['train_s']:.0f} s = "
                           f"{r['eval_s'] / r['train_s']:.3f}x" if r["eval_s"] else "-",
                     shown or "-", ", ".join(r["eval_failed"] or []) or "-"))
    table("the export's self-evaluation (all backends) vs train() wall time (export included); "
          "the PyTorch bundle's metrics", rows,
          ("family", "evaluation / training", "metrics (pytorch)", "failed"))
    for name, r in results.items():
        if r["eval_backends"]:
            print(f"{name}: " + "; ".join(
                f"{b} " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()
                                    if k.endswith(("/AP", "/mIoU", "/PQ")) and v is not None)
                for b, m in r["eval_backends"].items()))


if __name__ == "__main__":
    main()
