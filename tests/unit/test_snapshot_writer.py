"""The background writer, the checkpoint write path and snapshots, without training (fast)."""

import collections
import os
import stat
import sys
import threading

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer

from d2persist.files.atomic import sha256_file, torch_save
from d2persist.files.writer import BackgroundWriter
from d2persist.training.checkpointer import all_finite, snapshot_state


def test_writer_keeps_one_job_in_flight_and_hands_back_its_error():
    writer = BackgroundWriter()
    release, started, order = threading.Event(), threading.Event(), []

    def slow():
        started.set()
        release.wait(10)
        order.append("slow")

    writer.submit(slow)
    started.wait(10)
    threading.Timer(0.2, release.set).start()
    writer.submit(order.append, "next")  # must wait for ``slow`` first
    writer.wait()
    assert order == ["slow", "next"]

    def fail():
        raise OSError(28, "No space left on device")

    writer.submit(fail)
    with pytest.raises(OSError, match="No space left"):
        writer.wait()
    writer.check()  # reported once


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux scheduling policy")
def test_writer_thread_only_takes_idle_cpu():
    writer = BackgroundWriter()
    seen = []
    writer.submit(lambda: seen.append(os.sched_getscheduler(0)))
    writer.wait()
    assert seen == [os.SCHED_IDLE]
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the caller's policy is untouched


def test_checkpoint_write_drops_its_pages_and_keeps_umask(tmp_path, mocker):
    fadvise = mocker.spy(os, "posix_fadvise") if hasattr(os, "posix_fadvise") else None
    old = os.umask(0o027)
    try:
        digest, size = torch_save({"w": torch.arange(1000.0)}, str(tmp_path / "model.pth"))
    finally:
        os.umask(old)
    path = tmp_path / "model.pth"
    assert (digest, size) == (sha256_file(str(path)), path.stat().st_size)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(1000.0))
    assert os.listdir(tmp_path) == ["model.pth"]
    if fadvise is not None:
        assert [c.args[1:] for c in fadvise.call_args_list] == [(0, 0, os.POSIX_FADV_DONTNEED)]


def test_finiteness_check_catches_nan_and_inf_but_not_large_sums():
    big = torch.full((8,), 3e38)  # finite, but its sum overflows
    assert all_finite({"a": big, "n": torch.arange(3)})
    assert not all_finite({"a": big, "b": torch.tensor([1.0, float("nan")])})
    assert not all_finite({"b": torch.tensor([float("-inf"), 1.0], dtype=torch.float64)})
    assert not all_finite({"b": torch.tensor([float("inf"), 1.0], dtype=torch.bfloat16)})


def test_snapshot_reuses_an_earlier_snapshots_tensors_where_they_fit(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ck = DetectionCheckpointer(model, str(tmp_path), optimizer=optimizer)
    first = snapshot_state(ck, copy=True, iteration=0)  # no momentum yet
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    first["model"]["bias"] = torch.zeros(5)  # a buffer that no longer fits
    second = snapshot_state(ck, copy=True, into=first, iteration=1)

    weight = second["model"]["weight"]
    assert weight is first["model"]["weight"]  # overwritten in place, nothing allocated
    assert weight.data_ptr() != model.weight.data_ptr()  # a copy, not the live tensor
    assert torch.equal(weight, model.weight) and torch.equal(second["model"]["bias"], model.bias)
    assert second["model"]["bias"].shape == (2,)
    momentum = second["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, optimizer.state[model.weight]["momentum_buffer"])
    assert second["iteration"] == 1
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not torch.equal(weight, model.weight)  # training goes on without touching it


def test_snapshot_copies_every_container_a_state_dict_may_hold(tmp_path):
    Pair = collections.namedtuple("Pair", "scale shift")
    state = {"pair": Pair(torch.ones(2), 3), "steps": (torch.zeros(1), [torch.ones(1), "x"])}
    module = torch.nn.Linear(1, 1)
    ck = DetectionCheckpointer(module, str(tmp_path), extra=_State(state))

    copied = snapshot_state(ck, copy=True)["extra"]
    again = snapshot_state(ck, copy=True, into={"extra": copied})["extra"]

    for snap in (copied, again):
        assert type(snap["pair"]) is Pair and snap["pair"].shift == 3
        assert torch.equal(snap["pair"].scale, state["pair"].scale)
        assert snap["pair"].scale.data_ptr() != state["pair"].scale.data_ptr()
        assert isinstance(snap["steps"], tuple) and snap["steps"][1][1] == "x"
    assert again["pair"].scale is copied["pair"].scale  # reused in place


class _State:
    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state


class _Killed(BaseException):
    """A SIGKILL: nothing after it runs."""


@pytest.mark.parametrize("how", ["write", "link"])
def test_a_name_written_again_and_killed_before_its_sidecar_still_verifies(
        tmp_path, mocker, how):
    """
    model_final.pth (or model_best.pth, a replayed iteration) written again, killed after the
    new file is in place and before its sidecar: found without one (verified by loading), not
    with the old one's hash (reported damaged, and refused by every reader).
    """
    from d2persist.artifacts.checkpoints import verify_checkpoint
    from d2persist.training import checkpointer as module

    ckpt = module.PersistCheckpointer(torch.nn.Linear(2, 2), str(tmp_path))
    ckpt.write("model_final.pth", {"model": {"w": torch.zeros(2)}, "iteration": 1}, tag=False)
    ckpt.write("model_0000003.pth", {"model": {"w": torch.ones(2)}, "iteration": 3}, tag=False)
    mocker.patch.object(module, "write_text", side_effect=_Killed)  # the sidecar's write
    with pytest.raises(_Killed):
        if how == "write":
            ckpt.write("model_final.pth", {"model": {"w": torch.ones(2)}, "iteration": 3})
        else:
            ckpt.link("model_0000003.pth", "model_final.pth")
    final = tmp_path / "model_final.pth"
    assert torch.load(final, weights_only=True)["iteration"] == 3
    assert not (tmp_path / "model_final.pth.sha256").exists()
    assert verify_checkpoint(str(final)) is None
