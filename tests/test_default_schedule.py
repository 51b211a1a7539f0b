"""
The built-in default (`python tools/train_net.py`, no config file) as the demo runs it, shortened.

The full schedule and its targets (<= 120 s, AP50 >= 90 for several seeds and thread counts) are
bench/bench_default_schedule.py's job; this smoke test runs the same config and data for 40
iterations, with its periodic evaluation, and checks that it learns and ends as the demo expects.
"""

import json
import re

from helpers import REPO, TRAIN_NET, run_tool


def test_default_config_trains_evaluates_and_summarizes(tmp_path):
    out = tmp_path / "run"
    res = run_tool(
        TRAIN_NET, "OUTPUT_DIR", out, "SOLVER.MAX_ITER", 40, "SOLVER.STEPS", "(30,)",
        "SOLVER.WARMUP_ITERS", 10, "TEST.EVAL_PERIOD", 20, "SOLVER.CHECKPOINT_PERIOD", 20,
        "PERSIST.EXPORT_FORMATS", "['safetensors']", timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "metrics.json").read_text().splitlines()]
    losses = [r["total_loss"] for r in rows if "total_loss" in r]
    assert len(losses) >= 2 and losses[-1] < 0.8 * losses[0], losses  # it learns
    evaluated = [r["iteration"] for r in rows if "bbox/AP50" in r]
    assert evaluated == [19, 40], evaluated  # EVAL_PERIOD; after training (stored as MAX_ITER)
    log = (out / "log.txt").read_text()
    trained = re.findall(r"Total training time: (\S+)", log)
    assert len(trained) == 1, trained
    assert (out / "export" / "model.safetensors").is_file()
    assert sorted(p.name for p in out.glob("model_*.pth")) == [
        "model_0000019.pth", "model_0000039.pth", "model_best.pth", "model_final.pth"]
    summary = run_tool(f"{REPO}/tools/demo_summary.py", out, "--started", 0)
    assert summary.returncode == 0, summary.stderr
    final = [r for r in rows if "bbox/AP50" in r][-1]
    assert f"bbox/AP50 {final['bbox/AP50']:.1f}" in summary.stdout, summary.stdout
    assert f"training time   {trained[0]}" in summary.stdout, summary.stdout
