"""
One measured training process for the benchmarks (run by them, not by hand).

Prints one JSON line: wall and CPU time of ``trainer.train()``, peak RSS, and the seconds from
process start to the end of the first training iteration.
"""

import argparse
import json
import os
import resource
import sys
import time

START = time.time()  # as close to process start as Python gets; see also /proc/self/stat


def _process_start():
    """Wall-clock time this process started, from /proc (Linux)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return START


def _cpu_seconds():
    """CPU time (user + system) of all threads of this process so far."""
    t = os.times()
    return t.user + t.system


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True)
    parser.add_argument("--no-persist", action="store_true", help="no checkpointing at all")
    parser.add_argument("--stock", action="store_true",
                        help="detectron2's own synchronous PeriodicCheckpointer, no PersistHook")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-after-first-step", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="the test suite's tiny config")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    from detectron2.engine import HookBase
    from detectron2.utils.env import seed_all_rng

    from d2persist import PersistHook, PersistTrainer

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import TINY_OPTS, builtin_cfg

    tiny = TINY_OPTS if args.tiny else []
    no_eval = ["DATASETS.TEST", "()", "PERSIST.BEST_METRIC", ""]
    cfg = builtin_cfg(args.threads, tiny + ["OUTPUT_DIR", args.output] + no_eval + args.opts)
    seed_all_rng(cfg.SEED)
    first = {}

    class FirstStep(HookBase):
        def after_step(self):
            if "t" not in first:
                first["t"] = time.time()
                if args.stop_after_first_step:
                    raise SystemExit(0)

    trainer = PersistTrainer(cfg)
    if args.no_persist or args.stock:
        trainer._hooks = [h for h in trainer._hooks if not isinstance(h, PersistHook)]
    if args.stock:
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.engine.hooks import PeriodicCheckpointer

        checkpointer = DetectionCheckpointer(trainer.model, cfg.OUTPUT_DIR, trainer=trainer)
        trainer.register_hooks([PeriodicCheckpointer(checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD,
                                                     max_iter=cfg.SOLVER.MAX_ITER)])
    trainer.register_hooks([FirstStep()])
    trainer.resume_or_load(resume=args.resume)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    try:
        trainer.train()
    except SystemExit:
        pass
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    print(json.dumps({
        "train_wall": wall,
        "train_cpu": cpu,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "start_to_first_step": first.get("t", float("nan")) - _process_start(),
        "start_iter": trainer.start_iter,
    }))


if __name__ == "__main__":
    main()
