"""
Two processes under detectron2's real ``launch()`` (gloo on the CPU), evaluating mid-training
with a real EvalHook and COCOEvaluator on the shapes val split, then resumed. Every run gets a
short ``--dist-timeout``, so a hang fails the test in about a minute instead of stalling CI.
"""

import json
import os
import signal
import sys
import time

import pytest
import torch
from helpers import ONE_THREAD, REPO, TINY_OPTS, TRAIN_NET, kill_tree, run_tool, start_tool

STOCK_TRAINER = os.path.join(REPO, "tests", "scripts", "stock_trainer.py")
LAZY_TRAIN_NET = os.path.join(REPO, "tools", "lazyconfig_train_net.py")
#: seconds a process may wait for the other in a collective before the run fails
DIST = ["--num-gpus", 2, "--dist-url", "auto", "--dist-timeout", 60]
EVAL = ["DATASETS.TEST", "('shapes_val_10',)", "TEST.EVAL_PERIOD", 2, "SOLVER.CHECKPOINT_PERIOD", 2,
        "PERSIST.BEST_METRIC", "bbox/AP"]


def _resume_states(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt["iteration"], ckpt["trainer"]["hooks"]["PersistHook"]["resume"]


def _check_run(out, res, iterations, evaluations, export_eval=True):
    assert res.returncode == 0, res.stderr[-4000:]
    log = res.stdout + res.stderr
    assert log.count("Evaluation results for bbox") == evaluations, log[-4000:]
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    it, states = _resume_states(out / "model_final.pth")
    assert it == iterations - 1
    assert len(states) == 2  # both processes' RNG states and data positions
    assert states[0]["rng"]["torch"].shape == states[1]["rng"]["torch"].shape
    # the export measured itself: the main process predicted, both took part in the evaluation
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    if not export_eval:
        assert "evaluation" not in manifest  # PERSIST.EXPORT_EVAL False
        return _check_best(out, iterations)
    entry = manifest["evaluation"]
    assert entry["failed"] == [] and entry["images"] == 10, entry
    # each process kept its own BatchNorm statistics (DefaultTrainer's DDP does not broadcast
    # buffers), so the in-training evaluation was not of the exported weights alone: recorded,
    # and the PyTorch bundle is the reference
    assert entry["training"] and set(entry["training"]) == set(entry["backends"]["pytorch"])
    assert (entry["reference_from"], entry["reference"]) == ("pytorch",
                                                             entry["backends"]["pytorch"])
    assert "BatchNorm statistics" in entry["note"]
    _check_best(out, iterations)


def _listing(folder):
    """The files of a run folder, relative, without logs and TensorBoard events."""
    return sorted(os.path.relpath(os.path.join(d, n), folder)
                  for d, _, names in os.walk(folder) for n in names
                  if not n.startswith(("events.out", "log.txt")))


def _check_best(out, iterations):
    best = json.loads((out / "best.json").read_text())  # written by the main process only
    assert best["metric"] == "bbox/AP" and best["iteration"] <= iterations - 1
    assert torch.load(out / "model_best.pth", weights_only=True)["iteration"] == best["iteration"]


@pytest.mark.parametrize("tool", ["stock", "train_net"])
def test_two_processes_evaluate_mid_training_then_resume(tmp_path, tool):
    """The README's one-liner on a stock DefaultTrainer subclass, and tools/train_net.py."""
    script = STOCK_TRAINER if tool == "stock" else TRAIN_NET
    out = tmp_path / "run"
    args = [*DIST, *TINY_OPTS, *EVAL, "OUTPUT_DIR", out]
    first = run_tool(script, *args, "SOLVER.MAX_ITER", 4, env=ONE_THREAD, timeout=240)
    _check_run(out, first, 4, evaluations=2)  # after iteration 2, and the final one
    assert (out / "inference" / "coco_instances_results.json").is_file()
    if tool == "stock":
        return  # resuming is the same code for both (resume_or_load): once is enough
    # one global data stream: 4 iterations x 2 images, the same position on both processes
    assert [s["data"]["position"] for s in _resume_states(out / "model_final.pth")[1]] == [8, 8]
    # and the main process wrote what one process writes: the same files (logs aside)
    one = tmp_path / "one"
    single = run_tool(script, *TINY_OPTS, *EVAL, "OUTPUT_DIR", one, "SOLVER.MAX_ITER", 4)
    assert single.returncode == 0, single.stderr[-3000:]
    assert _listing(out) == _listing(one)

    more = run_tool(script, "--resume", *args, "SOLVER.MAX_ITER", 6, "PERSIST.EXPORT_EVAL", False,
                    env=ONE_THREAD, timeout=240)
    _check_run(out, more, 6, evaluations=1, export_eval=False)
    assert "Starting training from iteration 4" in more.stdout + more.stderr


def test_two_processes_lazyconfig_tool_evaluates_then_resumes(tmp_path):
    from test_lazy import LAZY_TINY

    out = tmp_path / "run"
    args = [*DIST, *LAZY_TINY, f"train.output_dir={out}", "train.eval_period=2",
            "train.checkpointer.period=2", "lr_multiplier.scheduler.milestones=[2,3]",
            "train.persist.best_metric=bbox/AP",
            "dataloader.test.num_workers=0",
            # the export's own evaluation: on 2 processes in the train_net tests above, for a
            # LazyConfig in test_lazy.py
            "train.persist.export_eval=False"]
    first = run_tool(LAZY_TRAIN_NET, *args, "train.max_iter=4", env=ONE_THREAD, timeout=240)
    _check_run(out, first, 4, evaluations=2, export_eval=False)
    more = run_tool(LAZY_TRAIN_NET, "--resume", *args, "train.max_iter=6", env=ONE_THREAD,
                    timeout=240)
    _check_run(out, more, 6, evaluations=1, export_eval=False)
    assert "Starting training from iteration 4" in more.stdout + more.stderr


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return sorted(int(p) for p in f.read().split())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_to_one_process_stops_both_after_the_same_iteration(tmp_path):
    out = tmp_path / "run"
    args = [*DIST, *TINY_OPTS, "SOLVER.MAX_ITER", 200, "SOLVER.CHECKPOINT_PERIOD", 100,
            "PERSIST.EXPORT", False, "OUTPUT_DIR", out]
    proc = start_tool(TRAIN_NET, *args, env=ONE_THREAD)
    try:
        deadline, log = time.monotonic() + 120, out / "log.txt"
        while not (log.is_file() and " iter: 19 " in log.read_text()):  # both are training
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        workers = [p for p in _children(proc.pid) if "multiprocessing" in
                   open(f"/proc/{p}/cmdline").read() and "spawn_main" in
                   open(f"/proc/{p}/cmdline").read()]
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGTERM)  # the one started last: rank 1, not the writer
        assert proc.wait(timeout=120) is not None, "the run did not stop"
    finally:
        kill_tree(proc.pid)
    assert proc.returncode != 0
    names = sorted(n for n in os.listdir(out) if n.endswith(".pth"))
    assert len(names) == 1 and names[0] != "model_final.pth", names
    assert (out / "last_checkpoint").read_text() == names[0]
    it, states = _resume_states(out / names[0])
    assert 19 <= it < 199
    # both processes stopped after iteration ``it``: it + 1 global batches of 2 images taken
    assert [s["data"]["position"] for s in states] == [2 * (it + 1)] * 2
    # resuming after a stop signal: test_clusters.py's torchrun test and test_hook.py
