#!/usr/bin/env python
"""
Prediction at scale (issue 32), ONNX Runtime, the built-in model, one run measured side by side:

1. images per second over a folder of images: a bare loop of ONNX Runtime's ``session.run``
   over the same images decoded and resized in advance (the limit), on one thread, on all
   cores, and on one thread in each of two processes at once (the ceiling of two workers on
   two cores); the same work as each Ray actor does (read, predict, JSON written) in this process on
   one thread (what Ray's engine adds is the difference); ``infer_single`` on the folder,
   ``d2persist predict`` on this machine, and ``d2persist predict --ray`` with 1 worker on one
   core and 2 workers on one core each (the scaling) and 1 worker on all cores. Each process's
   steady rate is taken from its outputs' times (those after the first third), so start-up
   (Ray's, the model's) is reported apart, as the wall time of the command;
2. ``d2persist serve``: p50 and p99 latency at 1, 4 and 16 concurrent clients against the
   predictor called in-process on the same images; where the difference goes: the predictor
   in-process again while the server sits idle beside it (what Ray's and Serve's own processes
   take from a model that uses every core), and Ray Serve's own request path here (a
   deployment that reads the image and answers at once, on a local Ray started as
   ``d2persist serve`` starts it).

Needs a finished run of the built-in model with ONNX (``--run``, e.g. a default run).
``--images 0`` measures the endpoint only.
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
    """
    Images per second of the outputs written into ``folder`` after its first third (a long
    job's rate: the start, actors and Ray's own processes starting, is in the command's wall
    time instead).
    """
    times = sorted(os.stat(os.path.join(d, n)).st_mtime for d, _, names in os.walk(folder)
                   for n in names if n.endswith(".json") and not n.startswith(".")
                   and n != "job.json" and not n.endswith(".error.json"))
    times = times[len(times) // 3:]
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


def bare_loop(bundle, images, threads=None, ready=None):
    """
    Images per second of session.run alone, inputs prepared in advance, on ``threads``
    intra-op threads (None: ONNX Runtime's choice, all cores); ``ready()``, if given, is
    called once the inputs are prepared, and the timing starts when it returns.
    """
    import numpy as np

    from d2persist.predict.images import image_input, resize_shortest_edge
    from d2persist.predict.onnx_predictor import load_onnx_predictor

    p = load_onnx_predictor(bundle, threads=threads)
    inputs = []
    for path in images:
        image = image_input(path, None, p.input_format)
        resized = resize_shortest_edge(image, p.min_size, p.max_size)
        inputs.append(np.ascontiguousarray(resized.transpose(2, 0, 1)))
    p.session.run(None, {"image": inputs[0]})
    if ready is not None:
        ready()
    start = time.perf_counter()
    for chw in inputs:
        p.session.run(None, {"image": chw})
    return len(inputs) / (time.perf_counter() - start)


def bare_pair(bundle, src):
    """
    Images per second of each of two one-thread bare loops (:func:`bare_loop`) run at once in
    two processes, both timed from the moment both have their inputs ready: what two cores
    give two processes here (shared caches, memory, the hypervisor), the ceiling of two
    workers per core.
    """
    code = ("import glob, sys; sys.path.insert(0, {bench!r}); from bench_scale import bare_loop;"
            "ready = lambda: (print('ready', flush=True), sys.stdin.readline());"
            "print(bare_loop({bundle!r}, sorted(glob.glob({pattern!r})), 1, ready))").format(
                bench=os.path.dirname(os.path.abspath(__file__)), bundle=bundle,
                pattern=os.path.join(src, "*"))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env=dict(os.environ, PYTHONWARNINGS="ignore")) for _ in range(2)]
    for p in procs:  # both prepared, then both timed
        if p.stdout.readline().strip() != "ready":
            raise SystemExit("failed: the two bare loops")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("failed: the two bare loops")
    return sum(float(out.split()[-1]) for out in outs) / 2


def actor_work(bundle, src, out):
    """
    Images per second of what a Ray actor does for each image of ``src`` (read, predict, the
    JSON written into ``out``), in this process, on one thread.
    """
    from d2persist.predict.onnx_predictor import load_onnx_predictor
    from d2persist.scale.batch import predict_source

    predict_source(load_onnx_predictor(bundle, threads=1), src, out)
    rate = _steady_rate(out)
    shutil.rmtree(out, ignore_errors=True)
    return rate


def in_process(bundle, images):
    """
    Seconds per image of the predictor called in-process (read, predict, JSON at the
    endpoint's default threshold: the same masks pasted).
    """
    from d2persist.layout import DEFAULT_MIN_SCORE
    from d2persist.predict.onnx_predictor import load_onnx_predictor

    p = load_onnx_predictor(bundle)
    p(images[0])
    times = []
    for path in images:
        start = time.perf_counter()
        p(path).to_json(image_name=path, min_score=DEFAULT_MIN_SCORE)
        times.append(time.perf_counter() - start)
    return times


def _percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def endpoint(bundle, images, clients, requests):
    """
    ``({clients: latencies}, in-process latencies with the server idle)`` of ``d2persist
    serve`` on 127.0.0.1.
    """
    data = [open(p, "rb").read() for p in images]
    with serving(bundle, "--backend", "onnxruntime") as url:
        for i in range(4):
            post_image(url + "/predict", data[i])  # warm
        beside = in_process(bundle, images[:20])
        out = {}
        for n in clients:
            with ThreadPoolExecutor(n) as pool:
                out[n] = list(pool.map(
                    lambda i: post_image(url + "/predict", data[i % len(data)]),
                    range(requests)))
        return out, beside


def serve_floor(images, requests):
    """
    Latencies at one client of Ray Serve's own request path: a deployment that reads the
    image and answers a small JSON at once, on a local Ray started as ``d2persist serve``
    starts it, behind Serve's HTTP proxy on 127.0.0.1.
    """
    import socket

    import ray
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(ray_actor_options={"num_cpus": os.cpu_count() or 1})
    class Answer:
        async def __call__(self, request: Request) -> JSONResponse:
            body = await request.body()
            return JSONResponse({"image": "upload", "bytes": len(body), "instances": []})

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = [open(p, "rb").read() for p in images]
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(Answer.bind(), name="floor", route_prefix="/")
        url = f"http://127.0.0.1:{port}/predict"
        for i in range(4):
            post_image(url, data[i])  # warm
        return [post_image(url, data[i % len(data)]) for i in range(requests)]
    finally:
        serve.shutdown()
        ray.shutdown()


def folder_table(bundle, src, images, work):
    """Part 1 of the docstring: ``d2persist predict`` and its limits, printed."""
    bare = bare_loop(bundle, images)
    bare1 = bare_loop(bundle, images, threads=1)
    pair = bare_pair(bundle, src)
    work1 = actor_work(bundle, src, os.path.join(work, "actor_work"))
    rows, walls = [], {}
    cases = {
        "infer_single": [os.path.join(TOOLS, "infer_single.py"), "--image", src,
                         "--artifacts", bundle, "--backend", "onnxruntime", "--json"],
        "predict, this machine": ["-m", "d2persist", "predict", src, "--artifacts", bundle,
                                  "--backend", "onnxruntime", "--output"],
        "predict --ray, 1 worker, 1 core": ["-m", "d2persist", "predict", src,
                                            "--artifacts", bundle, "--backend",
                                            "onnxruntime", "--ray", "--workers", 1,
                                            "--cpus-per-worker", 1, "--output"],
        "predict --ray, 2 workers": ["-m", "d2persist", "predict", src, "--artifacts",
                                     bundle, "--backend", "onnxruntime", "--ray",
                                     "--workers", 2, "--cpus-per-worker", 1, "--output"],
        "predict --ray, 1 worker, all cores": ["-m", "d2persist", "predict", src,
                                               "--artifacts", bundle, "--backend",
                                               "onnxruntime", "--ray", "--workers", 1,
                                               "--output"],
    }
    rates = {}
    for name, cmd in cases.items():
        out = os.path.join(work, name.replace(" ", "_").replace(",", ""))
        walls[name] = _command([*cmd, out])
        rates[name] = _steady_rate(out)
        shutil.rmtree(out, ignore_errors=True)
    rows.append(("bare session.run loop, all cores", f"{bare:.1f} images/s"))
    rows.append(("bare session.run loop, 1 thread (the limit per core)",
                 f"{bare1:.1f} images/s"))
    rows.append(("2 bare loops at once, 1 thread each: per loop",
                 f"{pair:.1f} images/s ({pair / bare1:.3f}x one alone: the ceiling per "
                 "core)"))
    rows.append(("an actor's work here, 1 thread (read, predict, JSON written)",
                 f"{work1:.1f} images/s ({work1 / bare1:.3f}x the loop per core)"))
    for name in cases:
        rows.append((f"{name}: steady rate, wall of the command",
                     f"{rates[name]:.1f} images/s ({rates[name] / bare:.3f}x the loop on "
                     f"all cores), {walls[name]:.1f} s"))
    one, two = rates["predict --ray, 1 worker, 1 core"], rates["predict --ray, 2 workers"]
    rows.append(("--ray 2 workers per core vs the bare loop on 1 thread",
                 f"{two / 2:.1f} vs {bare1:.1f} images/s per core = "
                 f"{two / 2 / bare1:.3f}x (goal >= 0.9)"))
    rows.append(("--ray 2 workers per core vs 2 bare loops at once",
                 f"{two / 2 / pair:.3f}x"))
    rows.append(("--ray 2 workers per core vs an actor's work here on 1 thread",
                 f"{two / 2 / work1:.3f}x (what Ray's engine costs)"))
    rows.append(("--ray 2 workers / 1 worker on 1 core (goal >= 1.7)", f"{two / one:.3f}x"))
    table(f"Prediction at scale: {len(images)} images, ONNX Runtime", rows)


def endpoint_table(bundle, base, quick):
    """Part 2 of the docstring: ``d2persist serve`` against the predictor, printed."""
    local = in_process(bundle, base[:20])
    served, beside = endpoint(bundle, base, (1, 4, 16), 48 if quick else 96)
    floor = serve_floor(base, 48 if quick else 96)
    rows = [("in-process predictor, p50 / p99",
             f"{median(local) * 1000:.1f} / {_percentile(local, 0.99) * 1000:.1f} ms"),
            ("in-process predictor, the server idle beside it, p50",
             f"{median(beside) * 1000:.1f} ms ({(median(beside) - median(local)) * 1000:+.1f}"
             " ms: Ray's and Serve's own processes)"),
            ("Ray Serve's own request path (a deployment answering at once), 1 client, "
             "p50 / p99",
             f"{median(floor) * 1000:.1f} / {_percentile(floor, 0.99) * 1000:.1f} ms")]
    for n, lat in served.items():
        rows.append((f"serve, {n} client(s), p50 / p99",
                     f"{median(lat) * 1000:.1f} / {_percentile(lat, 0.99) * 1000:.1f} ms"))
    rows.append(("serve p50 at 1 client - in-process p50 (goal <= 15 ms)",
                 f"{(median(served[1]) - median(local)) * 1000:.1f} ms"))
    table("d2persist serve against the predictor in-process", rows)


def main():
    args = parse_args(__doc__, repeats=1, run=True, images=1500)
    if not args.run:
        raise SystemExit("--run: a finished run of the built-in model with ONNX")
    bundle = os.path.join(args.run, "export")
    print(f"machine: {machine()}")
    base = val_images(False)
    copies = max(1, (200 if args.quick else args.images) // len(base))
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
        if args.images:
            folder_table(bundle, src, images, work)
        endpoint_table(bundle, base, args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
