"""PersistHook on a real detectron2 DefaultTrainer / PersistTrainer, tiny config, CPU."""

import os
import signal

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, HookBase
from helpers import REPO, TRAIN_NET, run_tool, tiny_cfg, train

from d2persist import ConfigRoundTripError, PersistHook, PersistTrainer
from d2persist.config import add_persist_config
from d2persist.errors import OutputDirNotEmptyError


def periodic_files(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith("model_") and n.endswith(".pth"))


@pytest.mark.parametrize(
    "period,max_iter,expected",
    [
        (2, 6, ["model_0000001.pth", "model_0000003.pth", "model_0000005.pth", "model_final.pth"]),
        (4, 6, ["model_0000003.pth", "model_final.pth"]),
        (10, 6, ["model_final.pth"]),  # a period larger than MAX_ITER
    ],
)
def test_checkpoint_names_follow_period(tmp_path, period, max_iter, expected):
    cfg = tiny_cfg(tmp_path, "SOLVER.CHECKPOINT_PERIOD", period, "SOLVER.MAX_ITER", max_iter,
                   "PERSIST.EXPORT", False)
    train(cfg)
    assert periodic_files(tmp_path) == expected
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    final = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert final["iteration"] == max_iter - 1
    assert set(final) >= {"model", "trainer", "iteration"}
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".d2persist-tmp")]


def test_stock_default_trainer_writes_each_checkpoint_once(tmp_path, mocker):
    cfg = tiny_cfg(tmp_path, "PERSIST.EXPORT", False, "PERSIST.ASYNC", False)
    saves = mocker.spy(torch, "save")
    train(cfg, trainer_cls=DefaultTrainer)  # whose own PeriodicCheckpointer would save too
    # model_0000005 is also model_final: the same bytes under two names, written once
    assert saves.call_count == 3
    assert periodic_files(tmp_path) == [
        "model_0000001.pth", "model_0000003.pth", "model_0000005.pth", "model_final.pth"
    ]
    a, b = tmp_path / "model_0000005.pth", tmp_path / "model_final.pth"
    assert os.stat(a).st_ino == os.stat(b).st_ino  # a hard link: no duplicate bytes
    assert (tmp_path / "config.yaml").is_file()


class _SeesPersistHookCalls(HookBase):
    """Records how often PersistHook.after_step had run when this hook's after_step runs."""

    def __init__(self, spy):
        self.spy, self.seen = spy, []

    def after_step(self):
        self.seen.append(self.spy.call_count)


def test_persist_hook_runs_after_every_other_hook_wherever_registered(tmp_path, mocker):
    spy = mocker.spy(PersistHook, "after_step")
    cfg = tiny_cfg(tmp_path, "PERSIST.EXPORT", False, "SOLVER.MAX_ITER", 3)
    trainer = DefaultTrainer(cfg)
    first = _SeesPersistHookCalls(spy)
    trainer.register_hooks([first, PersistHook(cfg)])
    later = _SeesPersistHookCalls(spy)
    trainer.register_hooks([later])  # registered after PersistHook: still runs before it
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert first.seen == later.seen == [0, 1, 2]
    assert spy.call_count == 3


def test_two_persist_hooks_are_refused(tmp_path):
    from d2persist import D2PersistError

    cfg = tiny_cfg(tmp_path, "PERSIST.EXPORT", False, "SOLVER.MAX_ITER", 2)
    with pytest.raises(D2PersistError, match="register only one"):
        train(cfg, hooks=[PersistHook(cfg)])  # PersistTrainer has one already
    assert not (tmp_path / "config.yaml").exists()


def test_stock_resume_or_load_starts_after_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path, "PERSIST.EXPORT", False, "SOLVER.MAX_ITER", 4)
    train(cfg, trainer_cls=DefaultTrainer)
    # detectron2 alone (no d2persist hook) resumes from what d2persist wrote
    cfg2 = tiny_cfg(tmp_path, "SOLVER.MAX_ITER", 8)
    stock = DefaultTrainer(cfg2)
    stock.resume_or_load(resume=True)
    assert stock.start_iter == 4
    assert stock.iter == 3
    # (DetectionCheckpointer on each checkpoint: test_stock.py)


def test_config_yaml_round_trips_with_plain_get_cfg(tmp_path, mocker):
    from detectron2.config import CfgNode

    cfg = tiny_cfg(tmp_path, "PERSIST.EXPORT", False, "SOLVER.MAX_ITER", 2,
                   "INPUT.FORMAT", "RGB", "MODEL.PIXEL_MEAN", [1.0, 2.0, 3.0])
    dumps = mocker.spy(CfgNode, "dump")
    train(cfg)
    assert dumps.call_count == 1  # resume_or_load checks, before_train reuses the checked text
    plain = get_cfg()  # no d2persist: its options are kept out of config.yaml
    plain.merge_from_file(str(tmp_path / "config.yaml"))
    assert plain.INPUT.FORMAT == "RGB"
    assert list(plain.MODEL.PIXEL_MEAN) == [1.0, 2.0, 3.0]
    assert plain.SOLVER.MAX_ITER == 2
    with_persist = add_persist_config(get_cfg())
    with_persist.merge_from_file(str(tmp_path / "persist.yaml"))
    assert with_persist.PERSIST.EXPORT is False


def test_config_that_cannot_load_back_fails_at_start_naming_keys(tmp_path):
    cfg = tiny_cfg(tmp_path)
    cfg.MODEL.POINT_HEAD = type(cfg)()  # as a project's add_pointrend_config would
    cfg.MODEL.POINT_HEAD.NUM_POINTS = 14
    cfg.MODEL.MY_KEY = 3
    with pytest.raises(ConfigRoundTripError, match=r"MODEL\.MY_KEY, MODEL\.POINT_HEAD\.NUM_POINTS"):
        train(cfg)
    assert not (tmp_path / "config.yaml").exists()
    assert not periodic_files(tmp_path)


def test_non_yaml_value_fails_at_start(tmp_path):
    import numpy as np

    cfg = tiny_cfg(tmp_path)
    cfg.MODEL.PIXEL_MEAN = [np.float32(x) for x in cfg.MODEL.PIXEL_MEAN]  # a classic slip
    with pytest.raises(ConfigRoundTripError, match=r"MODEL\.PIXEL_MEAN"):
        PersistHook(cfg).run.dump()


def test_retention_is_remembered_across_resume(tmp_path):
    opts = ["PERSIST.EXPORT", False, "PERSIST.MAX_TO_KEEP", 2, "SOLVER.CHECKPOINT_PERIOD", 1]
    train(tiny_cfg(tmp_path, *opts, "SOLVER.MAX_ITER", 4))
    assert periodic_files(tmp_path) == ["model_0000002.pth", "model_0000003.pth",
                                        "model_final.pth"]
    (tmp_path / "model_final.pth").unlink()  # pretend the run is to be extended
    (tmp_path / "model_final.pth.sha256").unlink()
    train(tiny_cfg(tmp_path, *opts, "SOLVER.MAX_ITER", 7), resume=True)
    # the files of the first session were dropped as the second one went on
    assert periodic_files(tmp_path) == ["model_0000005.pth", "model_0000006.pth",
                                        "model_final.pth"]


def test_refuses_to_overwrite_an_earlier_run(tmp_path):
    cfg = tiny_cfg(tmp_path, "PERSIST.EXPORT", False, "SOLVER.MAX_ITER", 2)
    train(cfg)
    before = (tmp_path / "model_final.pth").stat().st_mtime_ns
    with pytest.raises(OutputDirNotEmptyError, match="--resume"):
        train(cfg)
    with pytest.raises(OutputDirNotEmptyError):  # the hook alone guards a stock trainer too
        train(cfg, trainer_cls=DefaultTrainer)
    assert (tmp_path / "model_final.pth").stat().st_mtime_ns == before


class _SendSignalAt(HookBase):
    def __init__(self, it, sig):
        self.it, self.sig = it, sig

    def before_step(self):
        if self.trainer.iter == self.it:
            os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize("sig,exc", [(signal.SIGINT, KeyboardInterrupt),
                                     (signal.SIGTERM, SystemExit)])
def test_signal_saves_last_completed_iteration_and_no_final(tmp_path, sig, exc):
    cfg = tiny_cfg(tmp_path, "SOLVER.CHECKPOINT_PERIOD", 100)
    with pytest.raises(exc):
        train(cfg, hooks=[_SendSignalAt(2, sig)])
    assert periodic_files(tmp_path) == ["model_0000002.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"
    assert not (tmp_path / "export").exists()
    assert not isinstance(getattr(signal.getsignal(sig), "__self__", None), PersistHook)
    resumed = PersistTrainer(tiny_cfg(tmp_path, "SOLVER.CHECKPOINT_PERIOD", 100))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3


class _SignalAfterTraining(HookBase):
    """Sends its process SIGTERM in its after_train, as during EvalHook's final evaluation."""

    def after_train(self):
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_during_the_final_evaluation_stops_before_the_export(tmp_path):
    """
    SIGTERM while EvalHook evaluated the final weights (PersistHook's handler still in
    place): it was logged, and the run went on to export (and evaluate the export: minutes)
    past a preemption's grace period. It stops after the final checkpoint now; the resume
    exports.
    """
    cfg = tiny_cfg(tmp_path, "SOLVER.MAX_ITER", 3)
    with pytest.raises(SystemExit) as e:
        train(cfg, hooks=[_SignalAfterTraining()])
    assert e.value.code == 128 + signal.SIGTERM
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert not (tmp_path / "export" / "manifest.json").exists()
    assert not isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None),
                          PersistHook)
    train(tiny_cfg(tmp_path, "SOLVER.MAX_ITER", 3), resume=True)  # nothing to train: exports
    assert (tmp_path / "export" / "manifest.json").is_file()


def _sigterm_handler_name():
    return str(signal.getsignal(signal.SIGTERM))


class _ForksAPoolAt(HookBase):
    """Forks a worker pool mid-training, as an evaluator does (panopticapi's PQ), and ends it."""

    def __init__(self, it):
        self.it, self.ended, self.handlers, self.exits = it, None, None, None

    def after_step(self):
        import multiprocessing
        import threading

        import time

        if self.trainer.iter != self.it:
            return
        pool = multiprocessing.get_context("fork").Pool(1)
        assert pool.map(abs, [-1]) == [1]
        self.handlers = (str(signal.getsignal(signal.SIGTERM)),
                         pool.apply(_sigterm_handler_name))  # here, in the worker
        pool.map_async(time.sleep, [0.5])
        time.sleep(0.2)  # its worker in a task: terminate() SIGTERMs it, and holds the queue
        ending = threading.Thread(target=pool.terminate, daemon=True)
        ending.start()
        ending.join(30)
        self.ended = not ending.is_alive()
        for child in multiprocessing.active_children():  # a worker that survived: not a hang
            child.kill()
        ending.join(30)
        children = []  # SIGTERMed right after the fork: before their at-fork hook ran, or after
        for _ in range(16):
            pid = os.fork()
            if pid == 0:
                try:
                    time.sleep(3)  # the signal was lost: exit 0, late
                finally:
                    os._exit(0)
            os.kill(pid, signal.SIGTERM)
            children.append(pid)
        self.exits = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]


def test_a_process_forked_while_training_ends_on_sigterm(tmp_path):
    """
    A process forked during training (a DataLoader worker, an evaluator's pool) does not keep
    PersistHook's SIGINT/SIGTERM handlers (restored at fork): it answers as without them, so that
    ``Pool.terminate()`` ends its workers (it waited forever: the handler only took note);
    the training process's handler still saves and stops.
    """
    forks = _ForksAPoolAt(1)
    cfg = tiny_cfg(tmp_path, "SOLVER.CHECKPOINT_PERIOD", 100)
    with pytest.raises(SystemExit):
        train(cfg, hooks=[forks, _SendSignalAt(2, signal.SIGTERM)])
    assert forks.ended, "Pool.terminate() did not end its forked worker in 30 s"
    here, worker = forks.handlers  # the worker got the handler of before the training back
    assert "PersistHook" in here and worker == str(signal.SIG_DFL), forks.handlers
    # a SIGTERM that reached a child before its handlers were restored was not lost (blocked
    # across the fork: it had been, ~1 make test in 10, in panopticapi's pool)
    assert forks.exits == [-signal.SIGTERM] * 16, forks.exits
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"


class _PoisonWeightsAt(HookBase):
    def __init__(self, it):
        self.it = it

    def after_step(self):
        if self.trainer.iter == self.it:
            with torch.no_grad():
                next(self.trainer.model.parameters()).fill_(float("nan"))


def test_diverged_run_keeps_last_checkpoint_on_good_weights(tmp_path):
    cfg = tiny_cfg(tmp_path, "PERSIST.EXPORT", False)
    poison = _PoisonWeightsAt(3)  # weights turn NaN in iteration 3, which is due for a save
    trainer = PersistTrainer(cfg)
    trainer.register_hooks([poison])  # runs before PersistHook, which always runs last
    trainer.resume_or_load(resume=False)
    with pytest.raises(FloatingPointError):
        trainer.train()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (tmp_path / "model_final.pth").exists()
    ckpt = torch.load(tmp_path / "model_0000001.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_train_net_names_a_config_that_does_not_load(tmp_path):
    (tmp_path / "bad.yaml").write_text("MODEL: [unclosed\n")
    (tmp_path / "based.yaml").write_text("_BASE_: nothere.yaml\n")
    for name, why in (("bad.yaml", "ParserError"), ("based.yaml", "FileNotFoundError")):
        res = run_tool(TRAIN_NET, "--config-file", tmp_path / name, "OUTPUT_DIR", tmp_path / "o")
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith(f"train_net.py: error: The config {tmp_path / name} does not "
                               f"load ({why}: ")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "list.yaml").write_text("- MODEL\n")
    for name, what in (("empty.yaml", "empty"), ("list.yaml", "a list")):
        res = run_tool(TRAIN_NET, "--config-file", tmp_path / name, "OUTPUT_DIR", tmp_path / "o")
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
        assert res.stderr.strip().splitlines()[-1] == (
            f"train_net.py: error: The config {tmp_path / name} holds no mapping of config keys "
            f"(it is {what}).")
    assert not (tmp_path / "o").exists()


def test_train_net_refuses_weights_it_cannot_load_before_building(tmp_path):
    from helpers import TINY_OPTS

    out = tmp_path / "o"
    cases = [(["--eval-only"], [], "Nothing to evaluate: MODEL.WEIGHTS is empty and no checkpoint"),
             ([], ["MODEL.WEIGHTS", tmp_path / "nope.pth"], "nope.pth does not exist."),
             (["--config-file", f"{REPO}/configs/shapes_mask_rcnn_R_18_FPN_lazy.py"], [],
              "is a LazyConfig: train it with tools/lazyconfig_train_net.py.")]
    for options, overrides, message in cases:
        res = run_tool(TRAIN_NET, *options, *TINY_OPTS, "OUTPUT_DIR", out, *overrides)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("train_net.py: error: ") and message in last, last
    assert not out.exists()  # refused before anything was set up


def test_train_net_refuses_overwrite_and_resumes(tmp_path):
    from helpers import TINY_OPTS

    args = ["OUTPUT_DIR", tmp_path, "SOLVER.MAX_ITER", 2, "PERSIST.EXPORT", False]
    first = run_tool(TRAIN_NET, *TINY_OPTS, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_tool(TRAIN_NET, *TINY_OPTS, *args)
    assert again.returncode == 2
    last = again.stderr.strip().splitlines()[-1]
    assert last.startswith("train_net.py: error:") and "--resume" in last
    assert "Traceback" not in again.stderr
    more = run_tool(TRAIN_NET, "--resume", *TINY_OPTS, *args[:2], "SOLVER.MAX_ITER", 4,
                    "PERSIST.EXPORT", False)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "Starting training from iteration 2" in more.stdout


def test_a_diverging_run_ends_in_one_sentence_with_exit_code_3(tmp_path):
    from helpers import TINY_OPTS

    res = run_tool(TRAIN_NET, *TINY_OPTS, "SOLVER.BASE_LR", 100.0, "SOLVER.WARMUP_ITERS", 0,
                   "SOLVER.CLIP_GRADIENTS.ENABLED", False,
                   "SOLVER.MAX_ITER", 20, "SOLVER.CHECKPOINT_PERIOD", 1, "PERSIST.EXPORT", False,
                   "OUTPUT_DIR", tmp_path)
    assert res.returncode == 3, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]
    last = (tmp_path / "last_checkpoint").read_text()
    it = int(line.split("at iteration ")[1].split()[0])
    assert line.startswith("train_net.py: error: Training diverged (NaN or Inf) at iteration")
    assert f"last_checkpoint names {last}" in line and "--resume continues" in line
    assert "SOLVER.BASE_LR" in line and "SOLVER.CLIP_GRADIENTS" in line
    assert int(last[6:13]) < it  # saved before the iteration that diverged


class _FailsAfterTraining(HookBase):
    def after_train(self):
        raise RuntimeError("the final evaluation failed")


def test_a_hook_failing_after_training_still_lets_persisthook_clean_up(tmp_path):
    """
    An earlier hook's after_train raising (EvalHook's final evaluation): detectron2 calls no
    later hook's, and PersistHook's handlers stayed installed, its run lock held (a notebook's
    next run refused), the mirror's last uploads not waited for. Its cleanup runs now.
    """
    from d2persist.files.lock import _HELD

    mirror = tmp_path / "mirror"
    cfg = tiny_cfg(tmp_path / "run", "SOLVER.MAX_ITER", 3, "SOLVER.CHECKPOINT_PERIOD", 2,
                   "PERSIST.ASYNC", True, "PERSIST.MIRROR", f"file://{mirror}")
    with pytest.raises(RuntimeError, match="the final evaluation failed"):
        train(cfg, hooks=[_FailsAfterTraining()])
    assert not isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None),
                          PersistHook)
    assert os.path.realpath(tmp_path / "run") not in _HELD
    assert (mirror / "last_checkpoint").read_text() == (
        tmp_path / "run" / "last_checkpoint").read_text() == "model_0000001.pth"
    assert (mirror / "model_0000001.pth").read_bytes() == (
        tmp_path / "run" / "model_0000001.pth").read_bytes()
    import threading  # the mirror's upload thread ended (was left waiting for good)

    assert not [t for t in threading.enumerate() if t.name == "d2persist-mirror"]
