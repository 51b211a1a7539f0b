#!/usr/bin/env python
"""
``d2persist serve``: what request batching (``@serve.batch``) buys. The same server with
``--max-batch-size 8`` and ``1`` (no batching), alternating, each answering the same concurrent
requests (8 at a time) on 127.0.0.1: requests per second and the median latency.

Needs a finished run of the built-in model (``--run``); without one, trains 20 iterations.
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
    alternate,
    machine,
    median,
    parse_args,
    post_image,
    serving,
    table,
    val_images,
)


def measure(run, batch, images, requests, backend):
    with serving(run, "--backend", backend, "--max-batch-size", batch) as url:
        data = [open(p, "rb").read() for p in images]
        post_image(url + "/predict", data[0])  # warm
        with ThreadPoolExecutor(8) as pool:
            start = time.perf_counter()
            latencies = list(pool.map(
                lambda i: post_image(url + "/predict", data[i % len(data)]), range(requests)))
            wall = time.perf_counter() - start
        return requests / wall, median(latencies)


def main():
    args = parse_args(__doc__, repeats=2, run=True)
    print(f"machine: {machine()}")
    work = None
    run = args.run
    if run is None:
        work = tempfile.mkdtemp(prefix="d2persist-bench-")
        run = os.path.join(work, "run")
        subprocess.run([sys.executable, os.path.join(TOOLS, "train_net.py"), "OUTPUT_DIR", run,
                        "SOLVER.MAX_ITER", "20"], check=True, capture_output=True, cwd=REPO)
    images = val_images(True)
    requests = 24 if args.quick else 64
    try:
        results = {}
        for backend in ("pytorch", "onnxruntime"):
            got = alternate({b: (lambda b=b: measure(run, b, images, requests, backend))
                             for b in (8, 1)}, args.repeats)
            results[backend] = got
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)
    rows = []
    for backend, got in results.items():
        rate = {b: median([r for r, _ in v]) for b, v in got.items()}
        lat = {b: median([l for _, l in v]) for b, v in got.items()}
        rows += [(f"{backend}: requests/s, batch 8 / 1", f"{rate[8]:.1f} / {rate[1]:.1f} = "
                  f"{rate[8] / rate[1]:.3f}x"),
                 (f"{backend}: median latency, batch 8 / 1", f"{lat[8] * 1000:.0f} / "
                  f"{lat[1] * 1000:.0f} ms")]
    table(f"d2persist serve, {requests} requests 8 at a time, {args.repeats} alternating "
          "repeats (medians)", rows)


if __name__ == "__main__":
    main()
