#!/usr/bin/env python
"""
Deployment with ONNX Runtime, each a ratio measured side by side in one run (sides alternate,
medians), on the built-in model (full size, 2 training iterations). Peak RSS is read with GNU
time (/usr/bin/time):

1. cold start: infer_single.py --backend onnxruntime vs a DefaultPredictor script, process
   start to JSON written (target <= 0.25x; with ONNX Runtime's optimized graph in d2persist's
   cache, as from the second start on, <= 0.10x), and the same without the cache;
2. peak RSS of those two processes (target <= 0.5x);
3. per image over a folder: the ONNX Runtime predictor vs d2persist's PyTorch predictor (the
   evaluation path), same images, same thread count (target <= 1.0x);
4. ONNX export time (tools/export_model.py, and the export step alone) and model.onnx size.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import (
    REPO,
    alternate,
    machine,
    median,
    parse_args,
    per_image_timer,
    run,
    table,
    val_images,
)

BASELINE = os.path.join(REPO, "bench", "defaultpredictor_script.py")
INFER = os.path.join(REPO, "tools", "infer_single.py")
EXPORT = os.path.join(REPO, "tools", "export_model.py")


def run_rss(args, **kwargs):
    """
    Run a command to completion; returns (wall seconds, peak RSS in MiB of that process).

    The command runs under GNU time, which forks it from a small process: measured from this
    process (torch loaded), a child's peak RSS would start at this process's RSS, which it keeps
    across exec.
    """
    fd, rss_file = tempfile.mkstemp()
    os.close(fd)
    try:
        start = time.perf_counter()
        res = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss_file, *args],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)
        wall = time.perf_counter() - start
        if res.returncode != 0:
            raise SystemExit(f"command failed ({res.returncode}): {' '.join(args)}\n"
                             f"{res.stderr.decode(errors='replace')[-3000:]}")
        with open(rss_file) as f:
            return wall, int(f.read().split()[-1]) / 1024
    finally:
        os.unlink(rss_file)


def per_image(out, images, threads, repeats):
    import torch

    from d2persist import load_predictor
    from d2persist.predict.onnx_predictor import load_onnx_predictor

    torch.set_num_threads(threads)
    pt = load_predictor(os.path.join(out, "export"), device="cpu")
    ort = load_onnx_predictor(os.path.join(out, "export"), threads=threads)

    timed = {"onnxruntime": per_image_timer(ort, images), "pytorch": per_image_timer(pt, images)}
    for go in timed.values():  # warm-up
        go()
    res = alternate(timed, repeats)
    return median(res["onnxruntime"]), median(res["pytorch"])


def export_step(out):
    """Seconds of the ONNX export step alone (model in memory), and of the safetensors write."""
    from d2persist import load_predictor
    from d2persist.artifacts.bundle import read_manifest
    from d2persist.export.bundle import _weights_bytes
    from d2persist.export.onnx_graph import export_onnx

    bundle = os.path.join(out, "export")
    model = load_predictor(bundle, device="cpu").model
    contract = read_manifest(bundle)["input"]
    path = os.path.join(tempfile.mkdtemp(), "model.onnx")
    start = time.perf_counter()
    export_onnx(model, path, contract)
    onnx_s = time.perf_counter() - start
    start = time.perf_counter()
    _weights_bytes(model)
    st_s = time.perf_counter() - start
    shutil.rmtree(os.path.dirname(path))
    return onnx_s, st_s


def main():
    args = parse_args(__doc__, repeats=5)
    repeats = args.repeats
    images = val_images(args.quick)
    threads = os.cpu_count()
    print(f"machine: {machine()}; threads for both backends: {threads}")
    work = tempfile.mkdtemp(prefix="d2persist-bench-onnx-")
    try:
        out = os.path.join(work, "run")
        run([sys.executable, os.path.join(REPO, "tools", "train_net.py"), "OUTPUT_DIR", out,
             "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()", "PERSIST.BEST_METRIC", "",
             "PERSIST.EXPORT_FORMATS", "['safetensors', 'onnx']"], cwd=REPO)
        image, js = images[0], os.path.join(work, "p.json")
        ort_cmd = [sys.executable, INFER, "--image", image, "--artifacts", out, "--json", js,
                   "--backend", "onnxruntime"]
        cache = os.path.join(work, "cache")
        run(ort_cmd, cwd=work, env=dict(os.environ, D2PERSIST_CACHE=cache))  # fills it

        def empty_cache():
            return dict(os.environ, D2PERSIST_CACHE=tempfile.mkdtemp(dir=work))

        sides = {
            "infer_single.py --backend onnxruntime": lambda: run_rss(
                ort_cmd, cwd=work, env=dict(os.environ, D2PERSIST_CACHE=cache)),
            "the same, empty cache (first start)": lambda: run_rss(
                ort_cmd, cwd=work, env=empty_cache()),
            "DefaultPredictor script": lambda: run_rss(
                [sys.executable, BASELINE, out, image, js], cwd=work),
        }
        cold = alternate(sides, repeats)
        ort_ms, pt_ms = per_image(out, images, threads, repeats)
        tool_s = run([sys.executable, EXPORT, "--artifacts", out], cwd=work)
        onnx_s, st_s = export_step(out)
        onnx_size = os.path.getsize(os.path.join(out, "export", "model.onnx"))
        st_size = os.path.getsize(os.path.join(out, "export", "model.safetensors"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (a, e, b) = (median([w for w, _ in cold[k]]) for k in sides)
    (ra, re, rb) = (median([r for _, r in cold[k]]) for k in sides)
    table("Cold start: process start to JSON written (medians)", [
        ("infer_single.py --backend onnxruntime (optimized graph cached)", f"{a:.2f} s"),
        ("the same, empty cache (first start: optimizes, writes the cache)", f"{e:.2f} s"),
        ("DefaultPredictor script", f"{b:.2f} s"),
        ("ratio, cached (target <= 0.10)", f"{a / b:.3f}x"),
        ("ratio, empty cache (target <= 0.25)", f"{e / b:.3f}x"),
    ])
    table("Peak RSS of those processes (medians)", [
        ("infer_single.py --backend onnxruntime", f"{ra:.0f} MiB"),
        ("the same, empty cache", f"{re:.0f} MiB"),
        ("DefaultPredictor script", f"{rb:.0f} MiB"),
        ("ratio (target <= 0.5)", f"{ra / rb:.3f}x"),
    ])
    table(f"Per image over {len(images)} images, {threads} threads (medians)", [
        ("ONNX Runtime predictor (read, resize, run, paste, JSON)", f"{ort_ms * 1000:.1f} ms"),
        ("PyTorch predictor, the evaluation path (same steps)", f"{pt_ms * 1000:.1f} ms"),
        ("ratio (target <= 1.0)", f"{ort_ms / pt_ms:.3f}x"),
    ])
    table("Export", [
        ("tools/export_model.py, process start to manifest", f"{tool_s:.2f} s"),
        ("ONNX export step alone / safetensors bytes alone", f"{onnx_s:.2f} s / {st_s:.2f} s"),
        ("model.onnx / model.safetensors", f"{onnx_size / 2**20:.1f} / {st_size / 2**20:.1f} MiB"),
    ])


if __name__ == "__main__":
    main()
