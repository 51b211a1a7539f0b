"""
Two "machines" without a shared file system: two launch() process trees on 127.0.0.1
(``--num-machines 2 --machine-rank 0/1``), each in its own working folder with a relative
OUTPUT_DIR, killed mid-run and resumed; the result is bitwise the single-folder run's.
"""

import os
import re
import time

import torch
from helpers import (
    ONE_THREAD,
    TINY_OPTS,
    TRAIN_NET,
    assert_bitwise_equal,
    free_port,
    kill_tree,
    start_tool,
)

OPTS = [*TINY_OPTS, "SOLVER.MAX_ITER", 8, "SOLVER.CHECKPOINT_PERIOD", 2, "PERSIST.EXPORT", False,
        "OUTPUT_DIR", "out"]  # relative: each machine's own folder


def _start_machines(tmp_path, *extra):
    port = free_port()
    procs = []
    for rank in (0, 1):
        cwd = tmp_path / f"machine{rank}"
        cwd.mkdir(exist_ok=True)
        args = ["--num-gpus", 1, "--num-machines", 2, "--machine-rank", rank,
                "--dist-url", f"tcp://127.0.0.1:{port}", "--dist-timeout", 60, *extra, *OPTS]
        procs.append(start_tool(TRAIN_NET, *args, cwd=cwd, env=ONE_THREAD))
    return procs


def _kill(procs):
    for p in procs:
        kill_tree(p.pid)
        p.wait()


def _wait(procs, tmp_path, timeout=240):
    """Wait for both machines; a hang fails the test (and kills them) after ``timeout``."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            if p.wait(timeout=max(1.0, deadline - time.monotonic())) is None:
                raise AssertionError(f"the machines did not finish in {timeout} s (a hang?)")
    finally:
        _kill(procs)
    errors = [p.output()[1][-3000:] for p in procs]
    return [p.returncode for p in procs], errors


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_two_machines_resume_without_shared_folder_bitwise(tmp_path, launch2_run):
    # the reference: 2 processes under launch() in one folder, after iteration 7
    ref = launch2_run / "model_0000007.pth"

    procs = _start_machines(tmp_path)
    main_out = tmp_path / "machine0" / "out"
    deadline = time.monotonic() + 180
    try:  # a lost job: both machines killed once a checkpoint or two are written
        while not (main_out / "last_checkpoint").is_file() or (
            main_out / "last_checkpoint"
        ).read_text() < "model_0000003.pth":
            assert all(p.poll() is None for p in procs), "a machine exited early"
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.05)
    finally:
        _kill(procs)
    assert not [n for n in os.listdir(tmp_path / "machine1" / "out") if n.endswith(".pth")]
    # a stale file on the other machine, newer than the main process's newest: not trusted
    (tmp_path / "machine1" / "out" / "model_0000007.pth").write_bytes(b"from another run")

    codes, errors = _wait(_start_machines(tmp_path, "--resume"), tmp_path)
    assert codes == [0, 0], "\n".join(errors)
    assert_bitwise_equal(_weights(ref), _weights(main_out / "model_final.pth"))
    # only the main process writes: the other machine's folder holds no new checkpoint
    assert [n for n in os.listdir(tmp_path / "machine1" / "out") if n.endswith(".pth")] == [
        "model_0000007.pth"]
    log = (tmp_path / "machine1" / "out" / "log.txt.rank1").read_text()
    assert "holds model_0000007.pth" in log and "using the main process's checkpoint" in log
    assert re.search(r"Received model_\d{7}\.pth \(\d+\.\d MB\) from the main process", log)
