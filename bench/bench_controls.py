#!/usr/bin/env python
"""
Costs of the training controls on the built-in config, measured side by side in one process:

1. EMA weights (``PERSIST.EMA_DECAY``): the time of each average update against the time of
   the iteration it follows (target <= 3%), timed inside the run; and, as a check, N-iteration
   runs with and without EMA alternating (their wall-time ratio, noisier);
2. the validation loss (``PERSIST.VAL_LOSS``): the time of one pass over the test images against
   the evaluation (EvalHook's) of the same weights right after it, per image.
"""

import os
import shutil
import tempfile
import time

from common import alternate, builtin_cfg, machine, median, parse_args, table


def _trainer(out, threads, opts):
    """A PersistTrainer of the built-in config evaluating as tools/train_net.py does."""
    from detectron2.utils.env import seed_all_rng

    from d2persist import PersistTrainer
    from d2persist.export.self_eval import family_evaluator
    from d2persist.training.hook import PersistHook

    class Trainer(PersistTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            return family_evaluator(dataset_name, os.path.join(cfg.OUTPUT_DIR, "inference"),
                                    cfg.TEST.KEYPOINT_OKS_SIGMAS)

    cfg = builtin_cfg(threads, ["OUTPUT_DIR", out, "PERSIST.EXPORT", False, "PERSIST.PLOT",
                                False, "PERSIST.BEST_METRIC", "", "PERSIST.EXPORT_FROM", "final",
                                "SOLVER.CHECKPOINT_PERIOD", 0, *opts])
    seed_all_rng(cfg.SEED)
    trainer = Trainer(cfg)
    hook = next(h for h in trainer._hooks if isinstance(h, PersistHook))
    return trainer, hook


def _timed(obj, name, into):
    """Replace ``obj.name`` by a wrapper that appends each call's seconds to ``into``."""
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - start)

    setattr(obj, name, wrapper)


def ema_in_run(work, iters, threads):
    """(median update seconds, median iteration seconds without the update) of one run."""
    from detectron2.engine import HookBase

    out = tempfile.mkdtemp(dir=work)
    trainer, hook = _trainer(out, threads, ["SOLVER.MAX_ITER", iters, "DATASETS.TEST", "()",
                                            "PERSIST.EMA_DECAY", 0.9998])
    updates, steps = [], []
    _timed(hook._ema, "update", updates)

    class StepTimer(HookBase):  # first in the list: from before_step to the end of after_step
        def before_step(self):
            self.t = time.perf_counter()

    class StepEnd(HookBase):
        def __init__(self, timer):
            self.timer = timer

        def after_step(self):
            steps.append(time.perf_counter() - self.timer.t)

    timer = StepTimer()
    trainer.register_hooks([StepEnd(timer)])  # runs last but before PersistHook moves itself
    trainer._hooks.insert(0, timer)
    timer.trainer = trainer
    trainer.resume_or_load(resume=False)
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    n = min(len(updates), len(steps))
    own = [s - u for s, u in zip(steps[:n], updates[:n])][2:]  # not the first two: warm-up
    return median(updates[2:n]), median(own)


def whole_runs(work, iters, threads, repeats):
    def side(decay):
        def go():
            out = tempfile.mkdtemp(dir=work)
            trainer, _ = _trainer(out, threads, ["SOLVER.MAX_ITER", iters, "DATASETS.TEST", "()",
                                                 "PERSIST.EMA_DECAY", decay])
            trainer.resume_or_load(resume=False)
            start = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - start
            shutil.rmtree(out, ignore_errors=True)
            return wall
        return go

    return alternate({"EMA": side(0.9998), "no EMA": side(0.0)}, repeats)


def validation_against_evaluation(work, threads, images):
    """Seconds of the validation-loss pass and of the evaluation right after, per evaluation."""
    from detectron2.engine.hooks import EvalHook

    from d2persist.training import before_eval

    out = tempfile.mkdtemp(dir=work)
    name = "shapes_val" if images > 10 else "shapes_val_10"
    trainer, hook = _trainer(out, threads, ["SOLVER.MAX_ITER", 6, "DATASETS.TEST", f"('{name}',)",
                                            "TEST.EVAL_PERIOD", 2, "PERSIST.VAL_LOSS", True])
    losses, evals = [], []
    _timed(before_eval, "validation_loss", losses)
    evaluator = next(h for h in trainer._hooks if isinstance(h, EvalHook))
    _timed(evaluator, "_do_eval", evals)
    trainer.resume_or_load(resume=False)
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    return losses, evals


def main():
    args = parse_args(__doc__, repeats=3)
    iters = 15 if args.quick else 40
    threads = 0
    print(f"machine: {machine()}")
    work = tempfile.mkdtemp(prefix="d2persist-bench-")
    try:
        in_run = [ema_in_run(work, iters, threads) for _ in range(args.repeats)]
        walls = whole_runs(work, iters, threads, args.repeats)
        from detectron2.data import DatasetCatalog

        images = 10 if args.quick else len(DatasetCatalog.get("shapes_val"))
        losses, evals = validation_against_evaluation(work, threads, images)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    update, own = median([u for u, _ in in_run]), median([s for _, s in in_run])
    ratios = [u / s for u, s in in_run]
    pairs = [a / b for a, b in zip(walls["EMA"], walls["no EMA"])]
    table(f"EMA weights (PERSIST.EMA_DECAY 0.9998), built-in config, {iters} iterations, "
          f"{args.repeats} runs", [
              ("average update, median", f"{update * 1000:.2f} ms"),
              ("iteration without it, median", f"{own * 1000:.1f} ms"),
              ("update / iteration (target <= 0.03), median of runs",
               f"{median(ratios):.4f} ({min(ratios):.4f}-{max(ratios):.4f})"),
              ("whole runs, EMA / no EMA wall, median of alternating pairs",
               f"{median(pairs):.3f}x ({min(pairs):.3f}-{max(pairs):.3f})"),
          ])
    per = [(loss / images, ev / images) for loss, ev in zip(losses, evals)]
    table(f"Validation loss (PERSIST.VAL_LOSS) on {images} test images, {len(per)} evaluations", [
        ("loss pass per image, median", f"{median([p[0] for p in per]) * 1000:.1f} ms"),
        ("evaluation per image, median", f"{median([p[1] for p in per]) * 1000:.1f} ms"),
        ("loss pass / evaluation, median", f"{median([a / b for a, b in per]):.3f}x"),
    ])


if __name__ == "__main__":
    main()
