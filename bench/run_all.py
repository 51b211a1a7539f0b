#!/usr/bin/env python
"""Run every benchmark and print their tables. ``--quick`` passes on to each."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ["bench_default_schedule.py", "bench_training.py", "bench_predict.py", "bench_onnx.py",
           "bench_clusters.py", "bench_int8.py", "bench_runview.py", "bench_families.py",
           "bench_controls.py"]
#: these need a finished run with ONNX (--run): run them by hand
NEEDS_RUN = ["bench_serve.py", "bench_scale.py", "bench_batches.py"]


def main():
    extra = sys.argv[1:]
    for script in SCRIPTS:
        print(f"\n===== {script} {' '.join(extra)}", flush=True)
        code = subprocess.call([sys.executable, os.path.join(HERE, script), *extra], cwd=HERE)
        if code:
            sys.exit(code)
    print(f"\nNot run (they need --run RUN, a finished run with ONNX): {', '.join(NEEDS_RUN)}")


if __name__ == "__main__":
    main()
