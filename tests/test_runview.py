"""``d2persist ls`` and ``d2persist verify`` on real runs: d2persist's, a stock detectron2 one,
and a bundle alone; each kind of damage named by the file."""

import json
import os
import shutil

import pytest

from helpers import run_tool, tiny_cfg


def _cli(*args):
    """``python -m d2persist ARGS`` (what the ``d2persist`` console script runs)."""
    return run_tool("-m", "d2persist", *args)


def _copy_run(default_run, tmp_path):
    """The run, its files hard-linked (cheap): :func:`_own` a file before changing it."""
    out, _ = default_run
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("*.lock"), copy_function=os.link)
    return run


def _own(path):
    """Give ``path`` bytes of its own (no longer shared with the original run)."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    return path


def _flip(path, offset=None):
    data = bytearray(_own(path).read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_ls_rows_match_the_runs_files_and_metrics(default_run):
    out, _ = default_run
    res = _cli("ls", out, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(res.stdout)
    rows = {r["name"]: r for r in data["checkpoints"]}
    assert list(rows) == ["model_final.pth", "model_0000039.pth", "model_0000019.pth",
                          "model_best.pth"]  # newest first, the best last
    assert {n: r["iteration"] for n, r in rows.items()} == {
        "model_final.pth": 39, "model_0000039.pth": 39, "model_0000019.pth": 19,
        "model_best.pth": json.loads((out / "best.json").read_text())["iteration"]}
    assert rows["model_final.pth"]["markers"][0] == "last" and "final" in rows[
        "model_final.pth"]["markers"]
    assert all(r["size"] == (out / n).stat().st_size for n, r in rows.items())
    metrics = [json.loads(ln) for ln in (out / "metrics.json").read_text().splitlines()]
    at = {m["iteration"]: m for m in metrics if "bbox/AP" in m}
    assert rows["model_0000019.pth"]["metrics"]["bbox/AP"] == at[19]["bbox/AP"]
    assert rows["model_final.pth"]["metrics"]["segm/AP50"] == at[40]["segm/AP50"]  # after_train
    ex = data["export"]
    assert ex["complete"] and ex["formats"] == ["safetensors", "onnx", "onnx-int8"]
    assert ex["iteration"] == 39 and ex["evaluation"]["failed"] == []
    text = _cli("ls", out, "--verify")
    assert text.returncode == 0 and text.stdout.count("  ok") == 4, text.stdout
    assert "model_0000019.pth" in text.stdout and "onnxruntime-int8" in text.stdout
    # the forked run (tests/forkserver.py) answers as a fresh interpreter does
    fresh = run_tool("-m", "d2persist", "ls", out, "--verify", fresh=True)
    assert (fresh.returncode, fresh.stdout) == (text.returncode, text.stdout)


def test_verify_passes_a_fresh_run_and_its_bundle(default_run, capsys):
    import subprocess
    import sys

    from helpers import REPO, WITHOUT_TORCH

    from d2persist.artifacts.view import open_view

    out, _ = default_run
    for path in (out, out / "export"):
        res = _cli("verify", path)
        assert res.returncode == 0, res.stdout + res.stderr[-2000:]
        assert "everything verifies" in res.stdout and "PROBLEM" not in res.stdout
    main = os.path.join(REPO, "d2persist", "__main__.py")
    for args in (("verify", out / "export"), ("ls", out)):  # a deploy machine: no torch
        res = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, main, *map(str, args)],
                             capture_output=True, text=True, timeout=120, cwd=REPO)
        assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "everything verifies" in subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, main, "verify", str(out)], capture_output=True,
        text=True, timeout=120, cwd=REPO).stdout  # best.json checked by the sidecars
    capsys.readouterr()
    assert open_view(str(out)).verify(progress=True, workers=2) == ([], [])
    bar = capsys.readouterr().err  # tqdm: bytes hashed, over every checkpoint and bundle file
    assert "verify" in bar and "100%" in bar and "B/s" in bar, bar[-500:]


def test_verify_names_each_damaged_file(default_run, tmp_path):
    run = _copy_run(default_run, tmp_path)
    damaged = [run / "model_0000019.pth", run / "export" / "model.safetensors",
               run / "export" / "model.onnx"]
    for path in damaged:  # one flipped byte each
        _flip(path)
    last = run / (run / "last_checkpoint").read_text().strip()
    data = _own(last).read_bytes()
    last.write_bytes(data[:1000])  # last_checkpoint's target, truncated
    record_path = _own(run / "best.json")
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps(dict(record, iteration=record["iteration"] - 20)))
    res = _cli("verify", run)
    assert res.returncode == 1, res.stdout + res.stderr[-2000:]
    problems = [ln for ln in res.stdout.splitlines() if ln.startswith("PROBLEM: ")]
    assert all(str(run) in p for p in problems), res.stdout
    assert any("last_checkpoint names model_final.pth, which does not verify" in p
               for p in problems), res.stdout
    assert len(problems) == 6 and "Traceback" not in res.stderr, res.stdout
    records = _cli("verify", run, "--json")  # the same problems as records: nothing parsed
    assert records.returncode == 1, records.stderr[-2000:]
    found = {(p["path"], p["kind"]) for p in json.loads(records.stdout)["problems"]}
    assert found == {(str(p), "damaged") for p in damaged + [last]} | {
        (str(run / "last_checkpoint"), "inconsistent"), (str(run / "best.json"), "inconsistent")}
    listed = _cli("ls", run, "--verify")
    assert listed.returncode == 1 and listed.stdout.count("  DAMAGED") == 2, listed.stdout
    clean = _cli("verify", default_run[0])  # the original, untouched through the links
    assert clean.returncode == 0, clean.stdout


def test_a_stock_detectron2_run_verifies_with_notes(tmp_path):
    from detectron2.engine import DefaultTrainer

    cfg = tiny_cfg(tmp_path / "stock", "SOLVER.MAX_ITER", 3)
    trainer = DefaultTrainer(cfg)  # no PersistHook: detectron2's own checkpoints, no sidecars
    trainer.resume_or_load(resume=False)
    trainer.train()
    run = tmp_path / "stock"
    assert not list(run.glob("*.sha256")) and not (run / "config.yaml").exists()
    res = _cli("verify", run)
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]
    assert "without a .sha256 sidecar" in res.stdout and "No config.yaml" in res.stdout
    listed = json.loads(_cli("ls", run, "--json").stdout)
    assert [r["name"] for r in listed["checkpoints"]] == [
        "model_final.pth", "model_0000001.pth"]
    _flip(run / "model_0000001.pth", offset=200)
    res = _cli("verify", run)
    assert res.returncode == 1 and "model_0000001.pth" in res.stdout, res.stdout


def test_neither_a_run_nor_a_bundle_is_one_sentence(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    for args in (("ls", tmp_path), ("verify", tmp_path / "missing")):
        res = _cli(*args)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.strip().count("\n") == 0, res.stderr
    res = _cli("ls", tmp_path)
    assert "neither a run folder" in res.stderr and "nor an export bundle" in res.stderr


def test_diff_of_two_runs_shows_exactly_the_overridden_keys(trained_run, tmp_path):
    from helpers import train

    other = tmp_path / "other"
    train(tiny_cfg(other, "SOLVER.BASE_LR", 0.005, "PERSIST.MAX_TO_KEEP", 2))
    res = _cli("diff", trained_run, other, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    d = json.loads(res.stdout)
    assert d["config"] == {"OUTPUT_DIR": [str(trained_run), str(other)],
                           "SOLVER.BASE_LR": [0.01, 0.005]}
    assert d["persist"] == {"MAX_TO_KEEP": [0, 2]}
    assert d["classes"] == [["circle", "square", "triangle"]] * 2
    assert d["last_iteration"] == [5, 5]
    text = _cli("diff", trained_run / "export", other / "config.yaml")
    assert text.returncode == 0 and "SOLVER.BASE_LR: 0.01 -> 0.005" in text.stdout, text.stdout
    # a config file on a _BASE_ (the model zoo's way), its options onto the defaults
    from d2persist.artifacts.describe import diff

    derived = tmp_path / "derived.yaml"
    derived.write_text(f"_BASE_: {other / 'config.yaml'}\nSOLVER:\n  BASE_LR: 0.02\n"
                       "PERSIST:\n  MAX_TO_KEEP: 2\n")
    d = diff(str(other), str(derived))
    assert (d["config"], d["persist"]) == ({"SOLVER.BASE_LR": [0.005, 0.02]}, {})


def test_plot_holds_the_runs_series(default_run, tmp_path):
    from d2persist.artifacts.plot import plot_run
    from d2persist.artifacts.view import open_view

    out, _ = default_run
    rows = [json.loads(ln) for ln in (out / "metrics.json").read_text().splitlines()]
    fig = plot_run(open_view(str(out)))
    loss_ax, lr_ax, eval_ax = fig.axes

    def line(ax, label):
        return next(ln for ln in ax.get_lines() if ln.get_label() == label)

    total = line(loss_ax, "total_loss")
    assert list(total.get_ydata()) == [r["total_loss"] for r in rows if "total_loss" in r]
    assert {ln.get_label() for ln in loss_ax.get_lines()} >= {"loss_cls", "loss_mask"}
    assert list(line(lr_ax, "lr").get_xdata()) == [r["iteration"] for r in rows if "lr" in r]
    ap = line(eval_ax, "segm/AP")
    # the evaluations (evaluations.json), at the iteration of the weights evaluated
    assert list(ap.get_xdata()) == [19, 39]
    assert list(ap.get_ydata()) == [r["segm/AP"] for r in rows if "segm/AP" in r]
    best = json.loads((out / "best.json").read_text())
    star = line(eval_ax, "best segm/AP")
    assert (list(star.get_xdata()), list(star.get_ydata())) == (
        [best["iteration"]], [best["value"]])
    marks = sorted({ln.get_xdata()[0] for ln in eval_ax.get_lines()
                    if ln.get_gid() == "checkpoint"})
    assert marks == [19, 39]
    res = _cli("plot", out, "-o", tmp_path / "p.png")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the hook drew it into the run folder as well
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_png_appears_after_an_evaluation(tmp_path):
    import time

    from detectron2.engine import HookBase
    from helpers import EVAL_OPTS, eval_trainer, train

    class Watch(HookBase):
        """Runs before PersistHook's after_train (which draws the final picture)."""

        seen = None

        def after_train(self):
            deadline = time.monotonic() + 30
            path = tmp_path / "run" / "training.png"
            while not path.is_file() and time.monotonic() < deadline:
                time.sleep(0.2)
            Watch.seen = path.is_file()

    cfg = tiny_cfg(tmp_path / "run", *EVAL_OPTS, "SOLVER.MAX_ITER", 4,
                   "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.5)
    train(cfg, hooks=[Watch()], trainer_cls=eval_trainer())
    assert Watch.seen, "no training.png after the evaluation at iteration 1"
    off = tmp_path / "off"
    train(tiny_cfg(off, "PERSIST.PLOT", False, "SOLVER.MAX_ITER", 2))
    assert not (off / "training.png").exists()


def test_ls_lists_a_backend_a_later_version_evaluated(default_run, tmp_path):
    """A manifest's evaluation of a backend this version does not know: listed after the
    known ones (``ls`` ended in a ValueError traceback)."""
    run = _copy_run(default_run, tmp_path)
    manifest = _own(run / "export" / "manifest.json")
    data = json.loads(manifest.read_text())
    data["evaluation"]["backends"]["tensorrt"] = {"bbox/AP": 12.5}
    manifest.write_text(json.dumps(data))
    res = _cli("ls", run)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [ln.split()[0] for ln in res.stdout.splitlines() if ln.startswith("    ")]
    assert rows[-1] == "tensorrt" and "bbox/AP 12.5" in res.stdout, res.stdout


def test_an_onnx_task_this_version_does_not_know_is_refused(default_run, tmp_path):
    """A bundle whose ONNX model is of a task a later d2persist added: refused in one sentence
    (its outputs were post-processed as Mask R-CNN's, silently)."""
    from d2persist import ArtifactError, load_predictor
    from d2persist.export.onnx_graph import TASKS
    from d2persist.layout import ONNX_TASKS

    assert sorted(TASKS.values()) == sorted(ONNX_TASKS)  # (the two lists: one torch-free)
    run = _copy_run(default_run, tmp_path)
    manifest = _own(run / "export" / "manifest.json")
    data = json.loads(manifest.read_text())
    data["onnx"]["task"] = "depth"
    manifest.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"^The bundle's ONNX model is of task 'depth', "
                                            r"which this d2persist does not know"):
        load_predictor(str(run / "export"), backend="onnxruntime")
