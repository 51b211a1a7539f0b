"""Shared helpers of the benchmark scripts: side-by-side alternation, medians, a table."""

import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
TOOLS = os.path.join(REPO, "tools")

#: The tiny test config's overrides (KEY VALUE pairs), shared with the test suite.
from helpers import TINY_OPTS  # noqa: E402, F401


def builtin_cfg(threads, opts):
    """
    The built-in config (configs/shapes_mask_rcnn_R_18_FPN.yaml) with ``opts`` (KEY VALUE list)
    merged, the shapes datasets registered, and torch set to ``threads`` (0: its default).
    """
    import torch
    from detectron2.config import get_cfg

    from d2persist import add_persist_config
    from d2persist.data.shapes import register_shapes

    if threads:
        torch.set_num_threads(threads)
    register_shapes()
    cfg = add_persist_config(get_cfg())
    cfg.merge_from_file(os.path.join(REPO, "configs", "shapes_mask_rcnn_R_18_FPN.yaml"))
    cfg.merge_from_list(list(opts))
    return cfg


def machine():
    """One line describing this machine."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, {platform.platform()}"


def alternate(sides, repeats):
    """
    Run each side's callable ``repeats`` times, alternating (A B A B ...), so drifting machine
    load hits both alike. Each callable returns a number.

    Returns:
        dict: side name -> list of numbers.
    """
    out = {name: [] for name in sides}
    for i in range(repeats):
        order = list(sides.items()) if i % 2 == 0 else list(reversed(list(sides.items())))
        for name, fn in order:
            out[name].append(fn())
    return out


def per_image_timer(predictor, images):
    """A callable: seconds per image of ``predictor`` over ``images`` (predict, then JSON)."""
    def go():
        start = time.perf_counter()
        for path in images:
            predictor(path).to_json(path)
        return (time.perf_counter() - start) / len(images)
    return go


def median(xs):
    return statistics.median(xs)


def run(args, **kwargs):
    """Run a command (list) to completion; return wall seconds. Fails loudly."""
    start = time.perf_counter()
    res = subprocess.run(args, capture_output=True, text=True, **kwargs)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-3000:] + res.stderr[-3000:])
        raise SystemExit(f"command failed ({res.returncode}): {' '.join(map(str, args))}")
    return wall


def table(title, rows, header=("measure", "value")):
    """Print a small aligned table."""
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def parse_args(doc, repeats, run=False, images=None):
    """
    The benchmarks' common arguments: ``--quick``, ``--repeats`` (default ``repeats``), with
    ``run`` a ``--run DIR`` (a finished run to measure instead of training one), and with
    ``images`` an ``--images N`` (default ``images``).
    """
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and images")
    parser.add_argument("--repeats", type=int, default=None)
    if run:
        parser.add_argument("--run", help="a finished run of the built-in model to measure")
    if images:
        parser.add_argument("--images", type=int, default=images, help="how many images")
    args = parser.parse_args()
    args.repeats = args.repeats or (3 if args.quick else repeats)
    return args


def val_images(quick):
    """Files of the built-in val split: 10 with ``quick``, else 50."""
    from detectron2.data import DatasetCatalog

    from d2persist.data.shapes import register_shapes

    _, val = register_shapes()
    return [d["file_name"] for d in DatasetCatalog.get(val)[: 10 if quick else 50]]


@contextlib.contextmanager
def serving(artifacts, *flags):
    """
    ``d2persist serve ARTIFACTS FLAGS`` on a free port of 127.0.0.1, once it answers
    ``/healthz``: yields its URL; stopped (SIGTERM, then SIGKILL) on the way out.
    """
    import signal
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "d2persist", "serve", str(artifacts),
                             "--port", str(port), *map(str, flags)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(url + "/healthz", timeout=2).read()
                break
            except OSError:
                time.sleep(1)
        else:
            raise SystemExit(f"d2persist serve {artifacts} did not answer in 180 s")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def post_image(url, data):
    """POST an image's bytes to ``url``; the seconds until its JSON answer was read."""
    import json
    import urllib.request

    req = urllib.request.Request(url, data=data)
    req.add_header("Content-Type", "image/png")
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        json.loads(r.read())
    return time.perf_counter() - start
