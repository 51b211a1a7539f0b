"""Exact resume, crash safety and checkpoint verification, on real detectron2 (CPU)."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from detectron2.engine import HookBase
from helpers import (
    REPO,
    TINY_OPTS,
    TRAIN_NET,
    assert_bitwise_equal,
    kill_tree,
    run_tool,
    start_tool,
    tiny_cfg,
    train,
)

from d2persist import CheckpointWriteError, PersistTrainer


class _CrashAt(HookBase):
    """Raise as iteration ``it`` + 1 begins: iteration ``it`` is done, and saved if it was due."""

    def __init__(self, it):
        self.it = it

    def before_step(self):
        if self.trainer.iter == self.it + 1:
            raise RuntimeError("simulated crash")


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_run_is_bitwise_identical(tmp_path, workers):
    opts = ["DATALOADER.NUM_WORKERS", workers, "SOLVER.MAX_ITER", 8, "PERSIST.EXPORT", False,
            "SOLVER.CHECKPOINT_PERIOD", 3]
    train(tiny_cfg(tmp_path / "straight", *opts))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(tmp_path / "resumed", *opts), hooks=[_CrashAt(4)])
    assert (tmp_path / "resumed" / "last_checkpoint").read_text() == "model_0000002.pth"
    train(tiny_cfg(tmp_path / "resumed", *opts), resume=True)
    assert_bitwise_equal(
        _weights(tmp_path / "straight" / "model_final.pth"),
        _weights(tmp_path / "resumed" / "model_final.pth"),
    )


def test_resume_start_up_skips_indices_not_images(tmp_path, mocker):
    """Resuming at a late position maps only the images of the batches it trains on."""
    from detectron2.data import DatasetMapper

    opts = ["SOLVER.MAX_ITER", 2, "PERSIST.EXPORT", False]
    train(tiny_cfg(tmp_path, *opts))
    ckpt = torch.load(tmp_path / "model_final.pth", weights_only=True)
    state = ckpt["trainer"]["hooks"]["PersistHook"]["resume"][0]["data"]
    assert state["position"] == 4  # 2 iterations x 2 images
    trainer = PersistTrainer(tiny_cfg(tmp_path, *opts))
    loader = trainer.data_loader
    loader.load_state_dict(dict(state, position=10_000 * 2))  # as if at iteration 10,000
    calls = mocker.spy(DatasetMapper, "__call__")
    next(iter(loader))
    assert calls.call_count == 2  # the batch's two images, none of the 20,000 skipped


def _newest_tmp(folder):
    return [n for n in os.listdir(folder) if n.startswith(".d2persist-tmp-")]


def _saved_since(folder, started):
    """The checkpoints (their sidecars) written into ``folder`` since ``started`` (time.time())."""
    if not folder.is_dir():
        return []
    return [n for n in os.listdir(folder) if n.endswith(".pth.sha256")
            and os.stat(folder / n).st_mtime >= started]


def test_sigkill_at_random_moments_then_resume_matches_uninterrupted(tmp_path):
    """
    Kill harness: SIGKILL tools/train_net.py at random moments, including during a save; with
    EMA weights (PERSIST.EMA_DECAY, warm-up included), which continue bitwise too.
    """
    opts = [*TINY_OPTS, "SOLVER.MAX_ITER", 12, "SOLVER.CHECKPOINT_PERIOD", 2,
            "PERSIST.EXPORT", False, "DATALOADER.NUM_WORKERS", 1,
            "PERSIST.EMA_DECAY", 0.9, "PERSIST.EMA_WARMUP", 4]
    ref = run_tool(TRAIN_NET, *opts, "OUTPUT_DIR", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    rng = random.Random(1234)
    kills, resumed_from = 0, []
    for attempt in range(5):
        if attempt:
            resumed_from.append((out / "last_checkpoint").read_text()
                                if (out / "last_checkpoint").is_file() else None)
        args = [*(["--resume"] if attempt else []), *opts, "OUTPUT_DIR", out]
        started = time.time()
        proc = start_tool(TRAIN_NET, *args)
        killer_ready = None
        while proc.poll() is None:
            if attempt < 4 and _saved_since(out, started):
                # this attempt saved a checkpoint: kill at a random moment from now on, or
                # (every other attempt) the moment its next checkpoint is being written
                if killer_ready is None:
                    killer_ready = time.monotonic() + rng.uniform(0.0, 0.4)
                if attempt % 2 == 1 and any(".pth." in n for n in _newest_tmp(out)):
                    break
                if attempt % 2 == 0 and time.monotonic() >= killer_ready:
                    break
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        _, err = proc.communicate(timeout=240)
        kill_tree(proc.pid)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
    else:
        pytest.fail("training never finished")
    # every attempt after the first continued from a checkpoint its predecessor wrote
    assert None not in resumed_from and len(resumed_from) >= 2, resumed_from
    assert kills >= 2
    assert not _newest_tmp(out)
    assert_bitwise_equal(_weights(tmp_path / "ref" / "model_final.pth"),
                         _weights(out / "model_final.pth"))
    ref_ema, ema = (torch.load(p / "model_final.pth", weights_only=True)["trainer"]["hooks"][
        "PersistHook"]["ema"] for p in (tmp_path / "ref", out))
    assert ref_ema["updates"] == ema["updates"] == 12
    assert_bitwise_equal(ref_ema["model"], ema["model"])


@pytest.mark.parametrize("damage", ["truncate", "garble", "delete"])
def test_damaged_newest_checkpoint_falls_back(tmp_path, damage, caplog):
    opts = ["SOLVER.MAX_ITER", 5, "PERSIST.EXPORT", False]
    with pytest.raises(RuntimeError):
        train(tiny_cfg(tmp_path, *opts), hooks=[_CrashAt(3)])
    newest = tmp_path / "model_0000003.pth"
    if damage == "truncate":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    elif damage == "garble":
        data = bytearray(newest.read_bytes())
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(bytes(data))
    else:
        newest.unlink()
    trainer = PersistTrainer(tiny_cfg(tmp_path, *opts))
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2  # from model_0000001.pth
    assert any("model_0000003.pth" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)


def test_resume_refuses_another_model_and_a_schedule_already_past_and_names_changes(
        tmp_path, caplog):
    from d2persist import ConfigError

    opts = ["SOLVER.MAX_ITER", 4, "PERSIST.EXPORT", False]
    train(tiny_cfg(tmp_path, *opts))
    config = (tmp_path / "config.yaml").read_text()
    # another model's config: fvcore would skip the tensors of other shapes and train on (on a
    # fused SGD, the old momentum's shapes crashed the process)
    with pytest.raises(ConfigError, match=r"model_final.pth: it holds another model's weights "
                                          r"\(\d+ tensor\(s\) of other shapes, e.g. .*\(32,"):
        train(tiny_cfg(tmp_path, *opts, "MODEL.FPN.OUT_CHANNELS", 64), resume=True)
    # one layer more: refused before the optimizer's state (of fewer parameters) is loaded
    with pytest.raises(ConfigError, match=r"\(\d+ tensor\(s\) of this model missing, e.g. "
                                          r"roi_heads.mask_head.mask_fcn\d"):
        train(tiny_cfg(tmp_path, *opts, "MODEL.ROI_MASK_HEAD.NUM_CONV", 5), resume=True)
    with pytest.raises(ConfigError, match=r"\(\d+ tensor\(s\) this model does not have, e.g. "
                                          r"roi_heads.mask_head.mask_fcn\d"):  # one layer less
        train(tiny_cfg(tmp_path, *opts, "MODEL.ROI_MASK_HEAD.NUM_CONV", 1), resume=True)
    with pytest.raises(ConfigError, match="checkpoint is of iteration 3, past SOLVER.MAX_ITER 2"):
        train(tiny_cfg(tmp_path, *opts, "SOLVER.MAX_ITER", 2), resume=True)
    from d2persist.files.lock import lock_run_folder, unlock_run_folder

    assert lock_run_folder(str(tmp_path))  # released by the refusal: another run may take it
    unlock_run_folder(str(tmp_path))
    assert (tmp_path / "config.yaml").read_text() == config  # the run's own, kept
    assert sorted(p.name for p in tmp_path.glob("model_*.pth")) == [
        "model_0000001.pth", "model_0000003.pth", "model_final.pth"]
    caplog.clear()
    train(tiny_cfg(tmp_path, *opts, "SOLVER.MAX_ITER", 5, "SOLVER.BASE_LR", 0.02), resume=True)
    assert "differs from its config.yaml in SOLVER.BASE_LR (0.01 -> 0.02), SOLVER.MAX_ITER " \
           "(4 -> 5); config.yaml now records this one" in caplog.text


class _Killed(BaseException):
    """What a SIGKILL leaves: nothing after it runs, no ``except Exception`` either."""


def test_a_run_killed_before_it_named_final_or_evaluated_its_export_ends_on_resume(
        tmp_path, mocker):
    """
    A finished run extended (MAX_ITER 4 -> 6) and killed after its last checkpoint, before it
    named that one final and exported it: the resume, with nothing left to train, makes
    model_0000005 final and exports it, not keeps the earlier MAX_ITER's model_final and export
    it finds. Extended again (-> 8) and killed during its export's evaluation: the resume
    exports and evaluates again (a manifest never stays without its evaluation).
    """
    from helpers import eval_trainer

    from d2persist.training.checkpointer import PersistCheckpointer

    opts = ["DATASETS.TEST", "('shapes_val_10',)", "PERSIST.EXPORT_EVAL", True]
    manifest = tmp_path / "export" / "manifest.json"

    def train_to(max_iter):
        return train(tiny_cfg(tmp_path, *opts, "SOLVER.MAX_ITER", max_iter), resume=True,
                     trainer_cls=eval_trainer())

    train_to(4)
    exported = json.loads(manifest.read_text())
    assert exported["iteration"] == 3 and exported["evaluation"]["failed"] == []
    mocker.patch.object(PersistCheckpointer, "link", side_effect=_Killed)
    with pytest.raises(_Killed):
        train_to(6)
    mocker.stopall()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000005.pth"
    assert torch.load(tmp_path / "model_final.pth", weights_only=True)["iteration"] == 3
    assert train_to(6).start_iter == 6
    final = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert final["iteration"] == 5
    assert_bitwise_equal(final["model"], _weights(tmp_path / "model_0000005.pth"))
    exported = json.loads(manifest.read_text())
    assert exported["iteration"] == 5 and exported["evaluation"]["failed"] == []

    def written():
        return {p: (p.stat().st_ino, p.stat().st_mtime_ns)
                for p in (tmp_path / "model_final.pth", tmp_path / "model_final.pth.sha256",
                          manifest)}

    before = written()
    train_to(6)  # the same command again (a requeued job): nothing is written again
    assert written() == before

    mocker.patch("d2persist.training.hook.evaluate_run_export", side_effect=_Killed)
    with pytest.raises(_Killed):
        train_to(8)
    mocker.stopall()
    assert "evaluation" not in json.loads(manifest.read_text())
    assert train_to(8).start_iter == 8
    exported = json.loads(manifest.read_text())
    assert exported["iteration"] == 7 and exported["evaluation"]["failed"] == []


def test_stock_checkpoint_without_sidecar_is_verified_by_loading(tmp_path):
    from d2persist.artifacts.view import find_newest_valid

    opts = ["SOLVER.MAX_ITER", 5, "PERSIST.EXPORT", False]
    with pytest.raises(RuntimeError):
        train(tiny_cfg(tmp_path, *opts), hooks=[_CrashAt(3)])
    for name in ("model_0000001.pth", "model_0000003.pth"):
        os.unlink(tmp_path / (name + ".sha256"))  # as stock detectron2 would have left them
    newest = tmp_path / "model_0000003.pth"
    newest.write_bytes(newest.read_bytes()[:1000])
    assert find_newest_valid(str(tmp_path)) == str(tmp_path / "model_0000001.pth")


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
@pytest.mark.parametrize("asynchronous", [True, False])
def test_failing_write_keeps_earlier_checkpoints_and_stops(tmp_path, mocker, err, asynchronous):
    from d2persist.artifacts.checkpoints import verify_checkpoint

    real_save = torch.save
    calls = []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: write part of it, then the disk is full
            f.write(b"\0" * 4096)
            try:
                raise OSError(err, os.strerror(err))
            except OSError:  # what torch.save raises when its file's write() fails (seen on a
                # full tmpfs): a RuntimeError, the OSError only as its context
                raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos")
        return real_save(obj, f, *args, **kwargs)

    mocker.patch("torch.save", side_effect=failing_save)
    cfg = tiny_cfg(tmp_path, "PERSIST.ASYNC", asynchronous, "PERSIST.EXPORT", False)
    with pytest.raises(CheckpointWriteError, match=os.strerror(err)):
        train(cfg)
    assert verify_checkpoint(str(tmp_path / "model_0000001.pth")) is None
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (tmp_path / "model_0000003.pth").exists()
    assert not (tmp_path / "model_final.pth").exists()
    assert not _newest_tmp(tmp_path)
    assert len(calls) == 2  # training stopped at the failure


#: main's last commit before the package moved into subpackages (files/, artifacts/, predict/,
#: export/, training/): run folders and bundles it wrote must resume and predict after the move
BEFORE_THE_MOVE = "f2914363184f0a2d9cec83ef7a280f9a5c92b1ba"

_OLD_RUNS = """
import sys
sys.path[:0] = [{old!r}, {old!r} + "/tests"]
import d2persist
assert d2persist.__file__.startswith({old!r}), d2persist.__file__
from detectron2.engine import HookBase
from helpers import tiny_cfg, train

class Crash(HookBase):
    def before_step(self):
        if self.trainer.iter == 5:
            raise RuntimeError("simulated crash")

try:
    train(tiny_cfg({crashed!r}, *{opts!r}), hooks=[Crash()])
except RuntimeError:
    pass
train(tiny_cfg({exported!r}, "SOLVER.MAX_ITER", 2))
"""


def test_run_folder_written_before_the_move_resumes_and_predicts(tmp_path):
    from detectron2.data import DatasetCatalog

    from d2persist import load_predictor, open_view
    from d2persist.data.shapes import register_shapes

    old = tmp_path / "old"
    old.mkdir()
    try:
        archive = subprocess.run(["git", "-C", REPO, "archive", BEFORE_THE_MOVE, "d2persist",
                                  "tests/helpers.py", "configs"],
                                 capture_output=True, check=True).stdout
    except subprocess.CalledProcessError:
        pytest.skip(f"this clone lacks commit {BEFORE_THE_MOVE[:7]} (a shallow clone)")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    opts = ["SOLVER.MAX_ITER", 8, "PERSIST.EXPORT", False, "SOLVER.CHECKPOINT_PERIOD", 3]
    crashed, exported = tmp_path / "crashed", tmp_path / "exported"
    code = _OLD_RUNS.format(old=str(old), crashed=str(crashed), exported=str(exported), opts=opts)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (crashed / "last_checkpoint").read_text() == "model_0000002.pth"

    for folder in (crashed, exported, exported / "export"):
        problems, _ = open_view(str(folder)).verify()
        assert not problems, (folder, problems)
    image = DatasetCatalog.get(register_shapes()[1])[0]["file_name"]
    for artifacts in (crashed, exported / "export"):
        prediction = load_predictor(str(artifacts), backend="pytorch")(image)
        assert "instances" in prediction.to_json(), artifacts

    train(tiny_cfg(tmp_path / "straight", *opts))
    train(tiny_cfg(crashed, *opts), resume=True)
    assert_bitwise_equal(_weights(tmp_path / "straight" / "model_final.pth"),
                         _weights(crashed / "model_final.pth"))
