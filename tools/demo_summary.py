#!/usr/bin/env python
"""
The block ``make demo`` ends with: where the run, the export, the pictures and the JSON are,
the final and best metrics, training and total time, and how to predict on one's own image.

    python tools/demo_summary.py RUN_DIR [--started EPOCH_SECONDS]
"""

import argparse
import json
import os
import re
import sys
import time

from d2persist.layout import EVAL_BACKENDS

PROG = "demo_summary.py"
METRICS = ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50")
ORDER = EVAL_BACKENDS  # as the manifest's evaluation has them


def _final_metrics(run):
    """The last evaluation's METRICS from metrics.json (EvalHook's keys), or {}."""
    found = {}
    try:
        with open(os.path.join(run, "metrics.json"), encoding="utf-8") as f:
            for line in f:
                row = json.loads(line) if line.strip() else {}
                if any(k in row for k in METRICS):
                    found = {k: row[k] for k in METRICS if k in row}
    except (OSError, ValueError):
        pass
    return found


def _training_time(run):
    """detectron2's "Total training time" of the run's last training, or None."""
    try:
        with open(os.path.join(run, "log.txt"), encoding="utf-8") as f:
            times = re.findall(r"Total training time: (\S+)", f.read())
    except OSError:
        return None
    return times[-1] if times else None


def _export_evaluation(run):
    """Lines on what the export scored per backend (its manifest's evaluation entry)."""
    try:
        with open(os.path.join(run, "export", "manifest.json"), encoding="utf-8") as f:
            entry = json.load(f)["evaluation"]
    except (OSError, ValueError, KeyError, TypeError):
        return ["  export scores   (the export was not evaluated)"]
    lines = []
    backends = entry.get("backends", {})
    for backend in sorted(backends, key=lambda b: (ORDER + (b,)).index(b)):
        metrics = backends[backend]
        shown = ", ".join(f"{k} {metrics[k]:.1f}" for k in METRICS if metrics.get(k) is not None)
        diff = entry.get("max_difference", {}).get(backend) or 0.0
        lines.append(f"    {backend:17s} {shown} (max difference to training {diff:.2f})")
    for backend in entry.get("failed", []):
        lines.append(f"    {backend:17s} FAILED: {entry.get('errors', {}).get(backend)}")
    return [f"  export scores   on {entry.get('dataset')}, in export/manifest.json:"] + lines


def summary(run, started=None):
    """The summary's lines."""
    def where(*parts):
        path = os.path.join(run, *parts)
        return path if os.path.exists(path) else f"{path} (missing)"

    final = _final_metrics(run)
    lines = [
        "",
        "=" * 72,
        "d2persist demo: done",
        f"  run folder      {where()}",
        f"  export          {where('export')}",
        f"  pictures        {where('demo', 'prediction.png')}  (PyTorch)",
        f"                  {where('demo', 'prediction_onnx.png')}  (ONNX Runtime)",
        f"  JSON            {where('demo', 'prediction.json')}",
        f"                  {where('demo', 'prediction_onnx.json')}",
        "  final metrics   " + (", ".join(f"{k} {v:.1f}" for k, v in final.items())
                                or "(no evaluation recorded)"),
    ]
    try:
        with open(os.path.join(run, "best.json"), encoding="utf-8") as f:
            best = json.load(f)
        lines.append(f"  best            {best['metric']} {best['value']:.1f} after iteration "
                     f"{best['iteration']} (model_best.pth)")
    except (OSError, ValueError, KeyError, TypeError):
        lines.append("  best            (no best model recorded)")
    lines += _export_evaluation(run)
    lines.append(f"  training time   {_training_time(run) or '(not in log.txt)'}")
    if started is not None:
        lines.append(f"  total time      {time.time() - started:.0f} s (make demo, start to end)")
    lines += [
        "  predict on your own image:",
        f"    python tools/infer_single.py --artifacts {run} --image IMG.jpg --output out.png",
        f"    python tools/infer_single.py --artifacts {os.path.join(run, 'export')} "
        "--backend onnxruntime --image IMG.jpg --output out.png",
        f"    (add --precision int8 for {os.path.join(run, 'export', 'model.int8.onnx')})",
        "  score it on your own COCO dataset:",
        f"    python tools/evaluate.py --artifacts {os.path.join(run, 'export')} "
        "--coco-json ANN.json --image-root IMAGES/",
        "=" * 72,
    ]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("run", help="the demo's run folder (OUTPUT_DIR)")
    parser.add_argument("--started", type=float, help="when make demo started (epoch seconds)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.run):
        why = "is not a folder" if os.path.exists(args.run) else "does not exist"
        print(f"{PROG}: error: {args.run} {why}.", file=sys.stderr)
        return 2
    print("\n".join(summary(args.run, args.started)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
