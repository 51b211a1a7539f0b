#!/usr/bin/env python
"""
The built-in default: `python tools/train_net.py` (Mask R-CNN R-18 FPN from scratch on the
shapes data, CPU) must train and evaluate in <= 5 minutes wall and reach box AP50 >= 80 on the
held-out val split. Runs it once into a fresh folder and reads COCOEvaluator's copypaste lines.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from common import REPO, machine, table


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="40 iterations: checks the pipeline, not the targets")
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="d2persist-default-")
    opts = ["SOLVER.MAX_ITER", "40", "SOLVER.STEPS", "(30,)"] if args.quick else []
    print(f"machine: {machine()}")
    start = time.perf_counter()
    res = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "OUTPUT_DIR", out, *opts],
        capture_output=True, text=True, cwd=REPO,
    )
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-3000:] + res.stderr[-3000:])
        raise SystemExit("training failed")
    lines = [ln for ln in res.stdout.splitlines() if "copypaste:" in ln]
    values = [ln.split("copypaste:")[1].strip() for ln in lines]
    last = len(values) - 1 - values[::-1].index("Task: bbox")  # the final evaluation's
    bbox = values[last + 2].split(",")
    segm = values[values.index("Task: segm", last) + 2].split(",")
    speed = re.search(r"Overall training speed: .*", res.stdout)
    table("Default schedule (python tools/train_net.py)" + (" --quick" if args.quick else ""), [
        ("wall, process start to exit (target <= 300 s)", f"{wall:.0f} s"),
        ("training speed", speed.group(0).split(": ", 1)[1] if speed else "?"),
        ("box AP / AP50 (target AP50 >= 80)", f"{float(bbox[0]):.1f} / {float(bbox[1]):.1f}"),
        ("mask AP / AP50", f"{float(segm[0]):.1f} / {float(segm[1]):.1f}"),
    ])


if __name__ == "__main__":
    main()
