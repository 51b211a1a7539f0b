"""The background writer and the checkpoint write path, below the trainer."""

import os
import stat
import sys
import threading

import pytest
import torch

from d2persist.async_writer import BackgroundWriter
from d2persist.fileio import sha256_file, torch_save
from d2persist.hook import _all_finite


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
    assert _all_finite({"a": big, "n": torch.arange(3)})
    assert not _all_finite({"a": big, "b": torch.tensor([1.0, float("nan")])})
    assert not _all_finite({"b": torch.tensor([float("-inf"), 1.0], dtype=torch.float64)})
    assert not _all_finite({"b": torch.tensor([float("inf"), 1.0], dtype=torch.bfloat16)})
