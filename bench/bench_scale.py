#!/usr/bin/env python
"""
Prediction at scale (issue 32), ONNX Runtime, the built-in model, one run measured side by side:

1. images per second over a folder of images: a bare loop of ONNX Runtime's ``session.run``
   over the same images decoded and resized in advance (the limit), ``infer_single`` on the
   folder, ``d2persist predict`` on this machine, and ``d2persist predict --ray`` with 1 and 2
   workers. Each process's steady rate is taken from its outputs' times (first to last JSON),
   so start-up (Ray's, the model's) is reported apart, as the wall time of the command;
2. ``d2persist serve``: p50 and p99 latency at 1, 4 and 16 concurrent clients against the
   predictor called in-process on the same images.

Needs a finished run of the built-in model with ONNX (``--run``, e.g. a default run).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from common import (
    REPO,
    TOOLS,
    machine,
    median,
    parse_args,
    post_image,
    serving,
    table,
    val_images,
)


def _steady_rate(folder):
    """Images per second between the first and the last JSON written into ``folder``."""
    times = sorted(os.stat(os.path.join(d, n)).st_mtime for d, _, names in os.walk(folder)
                   for n in names if n.endswith(".json") and not n.startswith(".")
                   and n != "job.json" and not n.endswith(".error.json"))
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 2 else float("nan")


def _command(args):
    start = time.perf_counter()
    res = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                         cwd=REPO, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    wall = time.perf_counter() - start
    if res.returncode not in (0,):
        sys.stderr.write(res.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(map(str, args))}")
    return wall


def bare_loop(bundle, images):
    """Images per second of session.run alone, inputs prepared in advance (ORT's threads)."""
    import numpy as np

    from d2persist.predict.images import image_input, resize_shortest_edge
    from d2persist.predict.onnx_predictor import load_onnx_predictor

    p = load_onnx_predictor(bundle)
    inputs = []
    for path in images:
        image = image_input(path, None, p.input_format)
        resized = resize_shortest_edge(image, p.min_size, p.max_size)
        inputs.append(np.ascontiguousarray(resized.transpose(2, 0, 1)))
    p.session.run(None, {"image": inputs[0]})
    start = time.perf_counter()
    for chw in inputs:
        p.session.run(None, {"image": chw})
    return len(inputs) / (time.perf_counter() - start)


def in_process(bundle, images):
    """Seconds per image of the predictor called in-process (read, predict, JSON)."""
    from d2persist.predict.onnx_predictor import load_onnx_predictor

    p = load_onnx_predictor(bundle)
    p(images[0])
    times = []
    for path in images:
        start = time.perf_counter()
        p(path).to_json(image_name=path)
        times.append(time.perf_counter() - start)
    return times


def _percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def endpoint(bundle, images, clients, requests):
    """``{clients: latencies}`` of ``d2persist serve`` on 127.0.0.1."""
    data = [open(p, "rb").read() for p in images]
    with serving(bundle, "--backend", "onnxruntime") as url:
        for i in range(4):
            post_image(url + "/predict", data[i])  # warm
        out = {}
        for n in clients:
            with ThreadPoolExecutor(n) as pool:
                out[n] = list(pool.map(
                    lambda i: post_image(url + "/predict", data[i % len(data)]),
                    range(requests)))
        return out


def main():
    args = parse_args(__doc__, repeats=1, run=True)
    if not args.run:
        raise SystemExit("--run: a finished run of the built-in model with ONNX")
    bundle = os.path.join(args.run, "export")
    print(f"machine: {machine()}")
    base = val_images(False)
    copies = 2 if args.quick else 6
    work = tempfile.mkdtemp(prefix="d2persist-bench-")
    try:
        src = os.path.join(work, "images")
        os.makedirs(src)
        images = []
        for c in range(copies):
            for path in base:
                dst = os.path.join(src, f"{c}_{os.path.basename(path)}")
                shutil.copy(path, dst)
                images.append(dst)
        bare = bare_loop(bundle, images)
        rows, walls = [], {}
        cases = {
            "infer_single": [os.path.join(TOOLS, "infer_single.py"), "--image", src,
                             "--artifacts", bundle, "--backend", "onnxruntime", "--json"],
            "predict, this machine": ["-m", "d2persist", "predict", src, "--artifacts", bundle,
                                      "--backend", "onnxruntime", "--output"],
            "predict --ray, 1 worker": ["-m", "d2persist", "predict", src, "--artifacts",
                                        bundle, "--backend", "onnxruntime", "--ray",
                                        "--workers", 1, "--output"],
            "predict --ray, 2 workers": ["-m", "d2persist", "predict", src, "--artifacts",
                                         bundle, "--backend", "onnxruntime", "--ray",
                                         "--workers", 2, "--output"],
        }
        rates = {}
        for name, cmd in cases.items():
            out = os.path.join(work, name.replace(" ", "_").replace(",", ""))
            walls[name] = _command([*cmd, out])
            rates[name] = _steady_rate(out)
            shutil.rmtree(out, ignore_errors=True)
        cores = os.cpu_count() or 1
        rows.append(("bare session.run loop (the limit)", f"{bare:.1f} images/s"))
        for name in cases:
            rows.append((f"{name}: steady rate, wall of the command",
                         f"{rates[name]:.1f} images/s ({rates[name] / bare:.3f}x the loop), "
                         f"{walls[name]:.1f} s"))
        one, two = rates["predict --ray, 1 worker"], rates["predict --ray, 2 workers"]
        rows.append(("--ray per core vs the bare loop on all cores",
                     f"{two / cores:.1f} vs {bare / cores:.1f} images/s per core = "
                     f"{two / bare:.3f}x (goal >= 0.9)"))
        rows.append(("--ray 2 workers / 1 worker (goal >= 1.7)", f"{two / one:.3f}x"))
        table(f"Prediction at scale: {len(images)} images, ONNX Runtime", rows)
        local = in_process(bundle, base[:20])
        served = endpoint(bundle, base, (1, 4, 16), 48 if args.quick else 96)
        rows = [("in-process predictor, p50 / p99",
                 f"{median(local) * 1000:.1f} / {_percentile(local, 0.99) * 1000:.1f} ms")]
        for n, lat in served.items():
            rows.append((f"serve, {n} client(s), p50 / p99",
                         f"{median(lat) * 1000:.1f} / {_percentile(lat, 0.99) * 1000:.1f} ms"))
        rows.append(("serve p50 at 1 client - in-process p50 (goal <= 15 ms)",
                     f"{(median(served[1]) - median(local)) * 1000:.1f} ms"))
        table("d2persist serve against the predictor in-process", rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
