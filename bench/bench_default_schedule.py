#!/usr/bin/env python
"""
The built-in default schedule (`python tools/train_net.py`: Mask R-CNN R-18 FPN from scratch on
the shapes data, CPU) must train in <= 120 s (detectron2's "Total training time" line, evaluations
included) and reach box AP50 and mask AP50 >= 90 on the held-out val split, for each SEED and
torch thread count (not one lucky run).

Trains each variant once, one after the other, into a fresh folder; reads detectron2's
"Total training time" line and COCOEvaluator's copypaste lines of the final evaluation. Then says
where one iteration's time goes (``_iteration_profile.py``, for each thread count), for a fresh
model and for the first run's trained weights (late in training more ROIs are positive).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from common import REPO, machine, table

HERE = os.path.dirname(os.path.abspath(__file__))
TIME_TARGET_S = 120
AP50_TARGET = 90.0


def _seconds(hms):
    h, m, s = (int(x) for x in hms.split(":"))
    return 3600 * h + 60 * m + s


def train(seed, threads, opts, keep=None):
    """One training run; returns its measures (dict). ``keep``: where to copy its final weights."""
    out = tempfile.mkdtemp(prefix="d2persist-default-")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    res = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "OUTPUT_DIR", out,
         "SEED", str(seed), *opts],
        capture_output=True, text=True, cwd=REPO, env=env,
    )
    wall = time.perf_counter() - start
    if keep and res.returncode == 0:
        shutil.copyfile(os.path.join(out, "model_final.pth"), keep)
    shutil.rmtree(out, ignore_errors=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-3000:] + res.stderr[-3000:])
        raise SystemExit(f"training failed (SEED {seed}, {threads} threads)")
    values = [ln.split("copypaste:")[1].strip() for ln in res.stdout.splitlines()
              if "copypaste:" in ln]
    last = len(values) - 1 - values[::-1].index("Task: bbox")  # the final evaluation's
    bbox = [float(x) for x in values[last + 2].split(",")]
    segm = [float(x) for x in values[values.index("Task: segm", last) + 2].split(",")]
    total = re.search(r"Total training time: (\d+:\d\d:\d\d) \((\d+:\d\d:\d\d) on hooks\)",
                      res.stdout)
    speed = re.search(r"Overall training speed: \d+ iterations in \S+ \(([\d.]+) s / it\)",
                      res.stdout)
    return {
        "seed": seed, "threads": threads, "wall": wall,
        "train": _seconds(total.group(1)), "hooks": _seconds(total.group(2)),
        "s_per_it": float(speed.group(1)),
        "box_ap": bbox[0], "box_ap50": bbox[1], "mask_ap": segm[0], "mask_ap50": segm[1],
    }


def profile(threads, weights=""):
    """
    ``_iteration_profile.py``'s medians for the default config (ms per iteration, by phase), and
    the previous default's total, alternated with it in the same process; from ``weights`` if
    given.
    """
    res = subprocess.run(
        [sys.executable, os.path.join(HERE, "_iteration_profile.py"), "--threads", str(threads),
         "--previous", *(["--weights", weights] if weights else [])],
        capture_output=True, text=True, cwd=REPO,
    )
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-3000:] + res.stderr[-3000:])
        raise SystemExit("profile failed")
    return json.loads(res.stdout.strip().splitlines()[-1])


def spread(xs, fmt="{:.1f}"):
    return " / ".join(fmt.format(v) for v in (min(xs), statistics.median(xs), max(xs)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one variant of 40 iterations: checks the pipeline, not the targets")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    opts = []
    if args.quick:
        opts = ["SOLVER.MAX_ITER", "40", "SOLVER.STEPS", "(30,)", "TEST.EVAL_PERIOD", "0"]
        args.seeds, args.threads = args.seeds[:1], args.threads[:1]
    print(f"machine: {machine()}")
    runs = []
    # removed at exit, also when a run fails (TemporaryDirectory's finalizer)
    keep = tempfile.TemporaryDirectory(prefix="d2persist-default-weights-")
    trained = os.path.join(keep.name, "final.pth")
    for threads in args.threads:
        for seed in args.seeds:
            runs.append(train(seed, threads, opts, keep=None if runs else trained))
            r = runs[-1]
            print(f"SEED {seed}, {threads} thread(s): training {r['train']} s "
                  f"({r['hooks']} s hooks), {r['s_per_it']:.3f} s/it, box AP50 "
                  f"{r['box_ap50']:.1f}, mask AP50 {r['mask_ap50']:.1f}", flush=True)
    rows = [(f"SEED {r['seed']}, {r['threads']} thread(s)", f"{r['train']} s ({r['hooks']} s)",
             f"{r['wall']:.0f} s", f"{r['box_ap']:.1f} / {r['box_ap50']:.1f}",
             f"{r['mask_ap']:.1f} / {r['mask_ap50']:.1f}") for r in runs]
    rows.append(("min / median / max", spread([r["train"] for r in runs], "{:.0f}"),
                 spread([r["wall"] for r in runs], "{:.0f}"),
                 spread([r["box_ap50"] for r in runs]), spread([r["mask_ap50"] for r in runs])))
    table("Default schedule (python tools/train_net.py)" + (" --quick" if args.quick else ""),
          rows, header=("variant", "training (hooks), target <= 120 s", "start to exit",
                        "box AP / AP50 (>= 90)", "mask AP / AP50 (>= 90)"))
    met = all(r["train"] <= TIME_TARGET_S and min(r["box_ap50"], r["mask_ap50"]) >= AP50_TARGET
              for r in runs)
    print(f"targets {'met' if met else 'NOT met'} by every variant")
    phases = ("data", "backbone", "rpn", "roi_heads", "backward", "optimizer", "total")
    for title, weights in (("a fresh model", ""), ("the first run's trained weights", trained)):
        profiles = {t: profile(t, weights) for t in args.threads}
        table(f"One training iteration of {title}, by phase (ms, median of 20 after 5 warm-up)",
              [(p, *(f"{profiles[t][p]:.1f}" for t in args.threads)) for p in phases]
              + [("the previous default, alternated",
                  *(f"{profiles[t]['previous_total']:.1f}" for t in args.threads)),
                 ("ratio, this / previous",
                  *(f"{profiles[t]['ratio']:.3f}x" for t in args.threads))],
              header=("phase", *(f"{t} thread(s)" for t in args.threads)))
    keep.cleanup()


if __name__ == "__main__":
    main()
