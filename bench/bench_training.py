#!/usr/bin/env python
"""
Training-side costs of d2persist, each a ratio measured side by side in one run:

1. overhead: wall time of N iterations with PersistHook saving every 2 iterations (ASYNC on)
   vs the same run with no checkpointing at all (target <= 1.05x); measured twice: training on
   all cores, and training on one thread less than the machine has, which leaves the writer a
   core, as when a GPU trains and the CPU mostly waits;
2. peak memory (RSS) of those two runs;
3. resume cost: process start to the end of the first iteration after --resume, from a
   checkpoint at iteration 10 and at iteration 10,000 (must not grow);
4. the run's end: a 20-iteration run saving every 2 iterations, ``trainer.train()`` from start to
   return, PersistHook with ``PERSIST.PLOT`` True (the default: ``training.png`` drawn when
   training ends) and False, against detectron2's own synchronous ``PeriodicCheckpointer``.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from common import REPO, alternate, machine, median, table

PROBE = os.path.join(REPO, "bench", "_train_probe.py")


def probe(*args):
    res = subprocess.run([sys.executable, PROBE, *map(str, args)], capture_output=True,
                         text=True, cwd=REPO)
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-2000:] + res.stderr[-3000:])
        raise SystemExit("probe failed")
    return json.loads(res.stdout.strip().splitlines()[-1])


def overhead(work, iters, repeats, extra):
    runs = {"persist": [], "none": []}

    def side(name):
        def go():
            out = os.path.join(work, f"{name}-{len(runs[name])}")
            shutil.rmtree(out, ignore_errors=True)
            flags = ["--no-persist"] if name == "none" else []
            r = probe("--output", out, *flags, *extra, "SOLVER.MAX_ITER", iters,
                      "SOLVER.CHECKPOINT_PERIOD", 2, "PERSIST.EXPORT", False)
            shutil.rmtree(out, ignore_errors=True)
            runs[name].append(r)
            return r["train_wall"]
        return go

    alternate({"persist": side("persist"), "none": side("none")}, repeats)
    return runs


def run_end(work, repeats, extra):
    """train() wall time of PersistHook with PLOT on and off, and of stock PeriodicCheckpointer."""
    runs = {"plot": [], "no plot": [], "stock": []}
    flags = {"plot": ["PERSIST.PLOT", True], "no plot": ["PERSIST.PLOT", False],
             "stock": ["--stock"]}

    def side(name):
        def go():
            out = os.path.join(work, f"end-{name.replace(' ', '-')}-{len(runs[name])}")
            shutil.rmtree(out, ignore_errors=True)
            opts = [f for f in flags[name] if f == "--stock"]
            rest = [f for f in flags[name] if f != "--stock"]
            r = probe("--output", out, *opts, *extra, "SOLVER.MAX_ITER", 20,
                      "SOLVER.CHECKPOINT_PERIOD", 2, "PERSIST.EXPORT", False, *rest)
            shutil.rmtree(out, ignore_errors=True)
            runs[name].append(r["train_wall"])
            return r["train_wall"]
        return go

    alternate({name: side(name) for name in runs}, repeats)
    return runs


def pair_ratios(runs):
    """PersistHook / none wall time of each alternating pair (adjacent runs: drift cancels)."""
    return [p["train_wall"] / n["train_wall"] for p, n in zip(runs["persist"], runs["none"])]


def spread(ratios):
    return f"{min(ratios):.3f} / {median(ratios):.3f} / {max(ratios):.3f}"


def make_late_checkpoint(src, dst, iteration, per_iter_images):
    """A copy of checkpoint ``src`` claiming ``iteration`` (and the data position that goes with
    it), to measure resume start-up without training 10,000 iterations."""
    from d2persist import PersistCheckpointer
    from d2persist.layout import checkpoint_name

    ckpt = torch.load(src, weights_only=True)
    ckpt["iteration"] = ckpt["trainer"]["iteration"] = iteration
    for state in ckpt["trainer"]["hooks"]["PersistHook"]["resume"]:
        state["data"]["position"] = (iteration + 1) * per_iter_images
    sched = ckpt["trainer"]["hooks"].get("LRScheduler")
    if sched:
        sched["last_epoch"] = iteration + 1
    # the file, its sha256 sidecar and last_checkpoint, as a run writes them
    PersistCheckpointer(torch.nn.Module(), dst).write(checkpoint_name(iteration), ckpt)


def resume_cost(work, repeats, extra, batch):
    base = os.path.join(work, "resume-base")
    probe("--output", base, *extra, "SOLVER.MAX_ITER", 11, "SOLVER.CHECKPOINT_PERIOD", 11,
          "PERSIST.EXPORT", False)
    folders = {}
    for it in (10, 10_000):
        folder = os.path.join(work, f"resume-{it}")
        os.makedirs(folder)
        shutil.copy(os.path.join(base, "config.yaml"), folder)
        make_late_checkpoint(os.path.join(base, "model_0000010.pth"), folder, it, batch)
        folders[it] = folder

    def side(it):
        return lambda: probe("--output", folders[it], "--resume", "--stop-after-first-step",
                             *extra, "SOLVER.MAX_ITER", 20_000, "SOLVER.STEPS", "()",
                             "PERSIST.EXPORT", False)["start_to_first_step"]

    return alternate({"from iteration 10": side(10), "from iteration 10,000": side(10_000)},
                     repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations and repeats")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--run-end-only", action="store_true",
                        help="only measure 4. (the run's end), on the built-in config")
    args = parser.parse_args()
    if args.run_end_only:
        print(f"machine: {machine()}")
        work = tempfile.mkdtemp(prefix="d2persist-bench-")
        try:
            end = run_end(work, args.repeats or 3, [])
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return _run_end_table(end)
    iters = args.iters or (10 if args.quick else 40)
    repeats = args.repeats or (2 if args.quick else 5)
    extra = ["--tiny"] if args.quick else []
    batch = 2 if args.quick else 4
    print(f"machine: {machine()}")
    print(f"config: {'tiny test config' if args.quick else 'built-in shapes config'}, "
          f"{iters} iterations, {repeats} alternating repeats, medians")
    work = tempfile.mkdtemp(prefix="d2persist-bench-")
    try:
        runs = overhead(work, iters, repeats, extra)
        walls = {k: median([r["train_wall"] for r in v]) for k, v in runs.items()}
        cpu = {k: median([r["train_cpu"] for r in v]) for k, v in runs.items()}
        rss = {k: median([r["maxrss_mb"] for r in v]) for k, v in runs.items()}
        spare = max(1, (os.cpu_count() or 2) - 1)
        runs1 = overhead(work, iters, repeats, extra + ["--threads", spare])
        walls1 = {k: median([r["train_wall"] for r in v]) for k, v in runs1.items()}
        pairs, pairs1 = pair_ratios(runs), pair_ratios(runs1)
        resume = resume_cost(work, repeats, extra, batch)
        r10, r10k = (median(v) for v in resume.values())
        end = run_end(work, max(3, repeats), extra)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table("Training with PersistHook (save every 2 iterations, ASYNC) vs no checkpointing", [
        ("wall, PersistHook", f"{walls['persist']:.2f} s"),
        ("wall, no checkpointing", f"{walls['none']:.2f} s"),
        ("overhead ratio (target <= 1.05)", f"{walls['persist'] / walls['none']:.3f}x"),
        ("  per alternating pair: min / median / max", spread(pairs)),
        ("CPU time, PersistHook / none", f"{cpu['persist']:.1f} / {cpu['none']:.1f} s"),
        (f"cores busy training, no checkpointing (of {os.cpu_count()})",
         f"{cpu['none'] / walls['none']:.2f}"),
        (f"wall, training on {spare} thread(s), PersistHook / none",
         f"{walls1['persist']:.2f} / {walls1['none']:.2f} s"),
        ("overhead ratio, a core left to the writer (target <= 1.05)",
         f"{walls1['persist'] / walls1['none']:.3f}x"),
        ("  per alternating pair: min / median / max", spread(pairs1)),
        ("peak RSS, PersistHook", f"{rss['persist']:.0f} MB"),
        ("peak RSS, no checkpointing", f"{rss['none']:.0f} MB"),
        ("peak RSS ratio", f"{rss['persist'] / rss['none']:.3f}x"),
    ])
    table("Resume: process start to end of first iteration after --resume", [
        ("from iteration 10", f"{r10:.2f} s"),
        ("from iteration 10,000", f"{r10k:.2f} s"),
        ("ratio 10,000 / 10 (must not grow)", f"{r10k / r10:.3f}x"),
    ])
    _run_end_table(end)


def _run_end_table(end):
    ends = {k: median(v) for k, v in end.items()}
    title = ("The run's end: 20 iterations saving every 2, train() start to return (medians of "
             f"{len(end['stock'])} alternating repeats)")
    table(title, [
        ("PersistHook, PLOT True (default)", f"{ends['plot']:.2f} s"),
        ("PersistHook, PLOT False", f"{ends['no plot']:.2f} s"),
        ("stock PeriodicCheckpointer (synchronous)", f"{ends['stock']:.2f} s"),
        ("PersistHook PLOT True / stock", f"{ends['plot'] / ends['stock']:.3f}x"),
        ("PersistHook PLOT False / stock", f"{ends['no plot'] / ends['stock']:.3f}x"),
    ])


if __name__ == "__main__":
    main()
