#!/usr/bin/env python
"""
Prediction-side costs of d2persist, each a ratio measured side by side in one run:

1. cold start: infer_single.py (process start to JSON written) vs a DefaultPredictor script
   doing the same on the same image (target <= 1.0x);
2. per-image time over a folder: d2persist's predictor (read, resize, forward, JSON) vs the
   bare model-forward loop on pre-read inputs (target within 5%);
3. export size: model.safetensors vs model_final.pth (target <= 0.55x).
"""

import os
import shutil
import sys
import tempfile
import time

from common import REPO, alternate, machine, median, parse_args, run, table, val_images

BASELINE = os.path.join(REPO, "bench", "defaultpredictor_script.py")
INFER = os.path.join(REPO, "tools", "infer_single.py")


def train_run(out):
    """A short run of the built-in config: full-size model, so loading costs are real."""
    run([sys.executable, os.path.join(REPO, "tools", "train_net.py"), "OUTPUT_DIR", out,
         "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()", "PERSIST.BEST_METRIC", ""], cwd=REPO)


def per_image(out, images, repeats):
    import cv2
    import torch

    from d2persist import load_predictor
    from d2persist.predict.infer import predict_files

    predictor = load_predictor(os.path.join(out, "export"), device="cpu")
    model, aug = predictor.model, predictor.augmentation
    from detectron2.data import transforms as T

    inputs = []
    for p in images:  # the bare loop gets its inputs for free
        img = cv2.imread(p)
        ai = T.AugInput(img)
        aug(ai)
        inputs.append({"image": torch.as_tensor(ai.image.transpose(2, 0, 1).copy()),
                       "height": img.shape[0], "width": img.shape[1]})
    json_dir = tempfile.mkdtemp()

    def bare():
        start = time.perf_counter()
        with torch.inference_mode():
            for x in inputs:
                model([x])
        return (time.perf_counter() - start) / len(inputs)

    def ours():
        start = time.perf_counter()
        predict_files(predictor, images, json_out=json_dir, many=True, progress=False)
        return (time.perf_counter() - start) / len(images)

    bare()  # warm-up
    res = alternate({"d2persist": ours, "bare forward": bare}, repeats)
    shutil.rmtree(json_dir, ignore_errors=True)
    return median(res["d2persist"]), median(res["bare forward"])


def main():
    args = parse_args(__doc__, repeats=7)
    repeats = args.repeats
    images = val_images(args.quick)
    print(f"machine: {machine()}")
    work = tempfile.mkdtemp(prefix="d2persist-bench-")
    try:
        out = os.path.join(work, "run")
        train_run(out)
        image = images[0]
        js = os.path.join(work, "p.json")
        cold = alternate({
            "infer_single.py": lambda: run([sys.executable, INFER, "--image", image,
                                            "--artifacts", out, "--json", js, "--device", "cpu"],
                                           cwd=work),
            "DefaultPredictor script": lambda: run([sys.executable, BASELINE, out, image, js],
                                                   cwd=work),
        }, repeats)
        ours, bare = per_image(out, images, repeats)
        size = os.path.getsize(os.path.join(out, "export", "model.safetensors"))
        final = os.path.getsize(os.path.join(out, "model_final.pth"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a, b = median(cold["infer_single.py"]), median(cold["DefaultPredictor script"])
    table("Cold start: process start to JSON written (medians)", [
        ("infer_single.py", f"{a:.2f} s"),
        ("DefaultPredictor script", f"{b:.2f} s"),
        ("ratio (target <= 1.0)", f"{a / b:.3f}x"),
    ])
    table(f"Per image over a folder of {len(images)} images (medians)", [
        ("d2persist predictor (read, resize, forward, JSON)", f"{ours * 1000:.1f} ms"),
        ("bare model-forward loop", f"{bare * 1000:.1f} ms"),
        ("ratio (target <= 1.05)", f"{ours / bare:.3f}x"),
    ])
    table("Export size", [
        ("export/model.safetensors", f"{size / 2**20:.1f} MiB"),
        ("model_final.pth", f"{final / 2**20:.1f} MiB"),
        ("ratio (target <= 0.55)", f"{size / final:.3f}x"),
    ])


if __name__ == "__main__":
    main()
