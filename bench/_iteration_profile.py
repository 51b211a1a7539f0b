"""
Where one training iteration of a config spends its time (run by bench_default_schedule.py).

Builds the trainer of ``tools/train_net.py`` (its ``Trainer``: the fused SGD on a CPU) for the
config and the overrides given, then times
``--iters`` iterations after ``--warmup`` ones, phase by phase: the next batch from the data
loader, the forward pass of the backbone (with FPN), of the RPN and of the ROI heads, the backward
pass, and the optimizer step (gradient clipping included). Prints one JSON line: milliseconds per
iteration for each phase (medians) and their sum.

With ``--previous``, it also builds the default as it was before 2026-12-01's changes (detectron2's
own optimizer, weight decay 1e-4, 7 x 7 box features, a 64-channel mask head) and alternates one
iteration of each, so the two totals (``previous_total``, ``ratio``) see the same machine moment
by moment.

With ``--weights PATH`` (a trained run's checkpoint), both models start from those weights (the
parts whose shapes differ stay as built) at 1% of the base learning rate, so that they barely
move: iterations late in training, when the RPN proposes the objects and up to a quarter of the
sampled ROIs are positive (the mask head runs on each), where a fresh model has few.
"""

import argparse
import json
import os
import statistics
import sys
import time

#: The default before 2026-12-01 (with detectron2's optimizer): what --previous compares with.
PREVIOUS_OPTS = ["SOLVER.WEIGHT_DECAY", "0.0001", "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "7",
                 "MODEL.ROI_MASK_HEAD.CONV_DIM", "64"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--previous", action="store_true",
                        help="alternate with the previous default; report both totals")
    parser.add_argument("--weights", default="",
                        help="start from this trained checkpoint (late-stage iterations)")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.utils.events import EventStorage

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import REPO, builtin_cfg

    sys.path.insert(0, os.path.join(REPO, "tools"))
    from train_net import Trainer

    from d2persist import PersistTrainer

    def build(trainer_cls, opts):
        out = os.path.join("/tmp", f"d2persist-profile-{os.getpid()}")
        cfg = builtin_cfg(args.threads, ["OUTPUT_DIR", out] + opts)
        trainer = trainer_cls(cfg)
        if args.weights:
            DetectionCheckpointer(trainer.model).load(args.weights)
            for group in trainer.optimizer.param_groups:
                group["lr"] = 0.01 * cfg.SOLVER.BASE_LR
        trainer.model.train()
        return trainer.model, trainer.optimizer, iter(trainer.data_loader)

    model, optimizer, data = build(Trainer, args.opts)
    if args.previous:  # PersistTrainer: detectron2's build_optimizer
        previous = build(PersistTrainer, args.opts + PREVIOUS_OPTS)
    previous_times = []
    times = {k: [] for k in ("data", "backbone", "rpn", "roi_heads", "backward", "optimizer")}
    current = {}

    def timed(name, module):
        module.register_forward_pre_hook(lambda *_: current.__setitem__(name, time.perf_counter()))
        module.register_forward_hook(
            lambda *_: times[name].append(time.perf_counter() - current[name]))

    timed("backbone", model.backbone)
    timed("rpn", model.proposal_generator)
    timed("roi_heads", model.roi_heads)
    storage = EventStorage(0).__enter__()
    for i in range(args.warmup + args.iters):
        storage.iter = i
        if i == args.warmup:
            for v in times.values():
                v.clear()
        t0 = time.perf_counter()
        batch = next(data)
        t1 = time.perf_counter()
        losses = sum(model(batch).values())
        t2 = time.perf_counter()
        optimizer.zero_grad()
        losses.backward()
        t3 = time.perf_counter()
        optimizer.step()
        t4 = time.perf_counter()
        times["data"].append(t1 - t0)
        times["backward"].append(t3 - t2)
        times["optimizer"].append(t4 - t3)
        if args.previous:
            p_model, p_optimizer, p_data = previous
            t0 = time.perf_counter()  # from the batch on, like the phases' sum
            losses = sum(p_model(next(p_data)).values())
            p_optimizer.zero_grad()
            losses.backward()
            p_optimizer.step()
            previous_times.append(time.perf_counter() - t0)
    ms = {k: round(1000 * statistics.median(v), 1) for k, v in times.items()}
    ms["total"] = round(sum(ms.values()), 1)
    if args.previous:
        ms["previous_total"] = round(1000 * statistics.median(previous_times[args.warmup:]), 1)
        ms["ratio"] = round(ms["total"] / ms["previous_total"], 3)
    ms["threads"] = torch.get_num_threads()
    ms["weights"] = args.weights or "fresh"
    print(json.dumps(ms))


if __name__ == "__main__":
    main()
