#!/usr/bin/env python
"""
Cluster-side costs of d2persist, each a ratio measured side by side in one run (sides
alternate), with 2 processes (gloo, CPU) on the tiny test config:

1. per-iteration time with ``PERSIST.CHECKPOINT_MINUTES`` set (to a value that never fires
   during the run, so only the decision is measured) vs not set (target <= 1.01x); and, for
   scale, the per-iteration agreement itself: ``STOP_SIGNALS []`` (no agreement at all) vs the
   default. Per-iteration time is detectron2's own (metrics.json "time": the median of each
   20-iteration window), medians over the run after its first window;
2. resume start-up: ``torchrun --standalone --nproc-per-node 2`` vs ``--num-gpus 2``
   (``launch()``): wall time of a ``--resume`` from the same checkpoint (iteration 3) that trains
   one iteration and exits (target <= 1.1x).
"""

import json
import os
import shutil
import sys
import tempfile

from common import REPO, TINY_OPTS, alternate, machine, median, parse_args, run, table

TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
LAUNCH = ["--num-gpus", 2, "--dist-url", "auto"]
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", 2]
# both sides with the threads torchrun gives each worker
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=REPO)


def tool(*args):
    """A ``python ...`` command line of ``args`` (numbers become strings)."""
    return [sys.executable, *map(str, args)]


def iteration_time(out):
    """Median of detectron2's per-iteration "time" entries after the first window."""
    with open(os.path.join(out, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    times = [r["time"] for r in rows if "time" in r and r.get("iteration", 0) >= 39]
    return median(times)


def per_iteration(work, iters, repeats):
    sides = {
        "CHECKPOINT_MINUTES 1e6": ["PERSIST.CHECKPOINT_MINUTES", 1e6],
        "default (0)": [],
        "STOP_SIGNALS []": ["PERSIST.STOP_SIGNALS", "[]"],
    }
    counter = [0]

    def side(extra):
        def go():
            counter[0] += 1
            out = os.path.join(work, f"iter-{counter[0]}")
            run(tool(TRAIN_NET, *LAUNCH, *TINY_OPTS, "SOLVER.MAX_ITER", iters,
                     "SOLVER.CHECKPOINT_PERIOD", 100000, "PERSIST.EXPORT", False, *extra,
                     "OUTPUT_DIR", out), cwd=REPO, env=ENV)
            t = iteration_time(out)
            shutil.rmtree(out, ignore_errors=True)
            return t
        return go

    return alternate({name: side(extra) for name, extra in sides.items()}, repeats)


def resume_start_up(work, repeats):
    base = os.path.join(work, "base")
    opts = [*TINY_OPTS, "SOLVER.CHECKPOINT_PERIOD", 2, "PERSIST.EXPORT", False]
    run(tool(TRAIN_NET, *LAUNCH, *opts, "SOLVER.MAX_ITER", 4, "OUTPUT_DIR", base), cwd=REPO,
        env=ENV)
    counter = [0]

    def side(launcher, tool_args):
        def go():
            counter[0] += 1
            out = os.path.join(work, f"resume-{counter[0]}")
            shutil.copytree(base, out)
            wall = run(tool(*launcher, TRAIN_NET, *tool_args, "--resume", *opts,
                            "SOLVER.MAX_ITER", 5, "OUTPUT_DIR", out), cwd=REPO, env=ENV)
            shutil.rmtree(out, ignore_errors=True)
            return wall
        return go

    return alternate({"torchrun": side(TORCHRUN, []), "launch()": side([], LAUNCH)}, repeats)


def main():
    args = parse_args(__doc__, repeats=5)
    iters = 60 if args.quick else 100
    print(machine())
    work = tempfile.mkdtemp(prefix="d2persist-bench-clusters-")
    try:
        t = per_iteration(work, iters, args.repeats)
        r = resume_start_up(work, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = t["default (0)"]
    pairs = [a / b for a, b in zip(t["CHECKPOINT_MINUTES 1e6"], base)]
    agreement = [b / a for a, b in zip(t["STOP_SIGNALS []"], base)]
    rows = [(f"{name}: per iteration (ms)", " ".join(f"{1000 * x:.1f}" for x in xs),
             f"{1000 * median(xs):.1f}") for name, xs in t.items()]
    rows += [
        ("CHECKPOINT_MINUTES set / not (target <= 1.01x)",
         " ".join(f"{x:.3f}" for x in pairs), f"{median(pairs):.3f}x"),
        ("default / no agreement (the collective itself)",
         " ".join(f"{x:.3f}" for x in agreement), f"{median(agreement):.3f}x"),
    ]
    rows += [(f"resume start-up, {name} (s)", " ".join(f"{x:.2f}" for x in xs),
              f"{median(xs):.2f}") for name, xs in r.items()]
    ratios = [a / b for a, b in zip(r["torchrun"], r["launch()"])]
    rows.append(("resume start-up torchrun / launch() (target <= 1.1x)",
                 " ".join(f"{x:.3f}" for x in ratios), f"{median(ratios):.3f}x"))
    table(f"2 processes, {iters} iterations, {args.repeats} alternating repeats", rows,
          header=("measure", "each repeat", "median"))


if __name__ == "__main__":
    main()
