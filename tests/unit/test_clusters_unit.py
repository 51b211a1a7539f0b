"""
The pieces of cluster runs that need no training: the run lock (a real OS lock held by another
real process), the global batch plan for 1, 2 and 4 processes, and the new options' checks.
"""

import os
import signal
import subprocess
import sys

import pytest
from helpers import tool_env

from d2persist import ConfigError, RunFolderBusyError
from d2persist.files.lock import lock_run_folder, read_lock_holder, unlock_run_folder
from d2persist.layout import LOCK_NAME
from d2persist.training.state import ResumableTrainLoader, data_state_to_resume

_HOLDER = """
import os, sys, time
from d2persist.files.lock import lock_run_folder
lock_run_folder(sys.argv[1])
child = os.fork()  # as a DataLoader worker: it must not keep the lock once its parent died
if child == 0:  # the fork handler closed the lock's fd before fork() returned here
    os.write(1, b"child\\n")  # one write each, under PIPE_BUF: lines never interleave
    time.sleep(120)
    os._exit(0)
os.write(1, f"locked {child}\\n".encode())
time.sleep(120)
"""


def test_run_lock_keeps_out_another_process_and_dies_with_its_holder(tmp_path):
    folder = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, folder], stdout=subprocess.PIPE,
                              text=True, env=tool_env())
    child = None
    try:
        # both lines, in either order: the test must not kill the holder before its child
        # ran (under load it may not have been scheduled yet)
        lines = sorted(holder.stdout.readline().split() for _ in range(2))
        assert lines[0] == ["child"] and lines[1][0] == "locked", lines
        child = lines[1][1]
        with pytest.raises(RunFolderBusyError, match=rf"pid {holder.pid}, since \d{{4}}-") as e:
            lock_run_folder(folder)
        assert "\n" not in str(e.value) and "another training run" in str(e.value)
        assert read_lock_holder(folder)["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)  # as a crash: no clean-up of its own
        holder.wait(timeout=30)
        holder.stdout.close()
    try:
        # the kernel released it, though the forked child lives: a killed run never blocks
        # its own resume
        assert os.kill(int(child), 0) is None
        assert lock_run_folder(folder)
    finally:
        if child:
            os.kill(int(child), signal.SIGKILL)
    try:
        assert read_lock_holder(folder)["pid"] == os.getpid()
        assert not lock_run_folder(folder)  # the holder taking it again: nothing happens
    finally:
        unlock_run_folder(folder)
    assert os.listdir(folder) == [LOCK_NAME]


_ATTEMPT = """
import os, sys
from d2persist.files.lock import lock_run_folder, note_run_started, restarted_run_started
folder, step = sys.argv[1:]
if step == "ask":  # what a worker torchrun restarted asks
    print(restarted_run_started(folder))
    sys.exit(0)
lock_run_folder(folder)
if step == "start":
    note_run_started(folder)  # past its start-up checks: it trains
    sys.exit(0)
os.kill(os.getpid(), 9)  # killed while it starts (an OOM building the model)
"""


def test_a_restart_killed_while_it_starts_leaves_the_run_resumable_by_the_next(tmp_path):
    """
    Attempts of one launcher (children of this process, as torchrun's workers are of it): the
    first gets past its start-up checks; a restart killed before it does must not make the
    run look never started to the restart after it (which would start it over: refused).
    """
    folder = str(tmp_path / "run")

    def attempt(step):
        return subprocess.run([sys.executable, "-c", _ATTEMPT, folder, step], timeout=120,
                              capture_output=True, text=True, env=tool_env())

    assert attempt("ask").stdout.strip() == "False"  # nothing ran yet
    assert attempt("start").returncode == 0
    assert attempt("ask").stdout.strip() == "True"
    assert attempt("killed").returncode == -signal.SIGKILL
    assert attempt("ask").stdout.strip() == "True"


class _Killed(BaseException):
    """A SIGKILL: nothing after it runs."""


def test_a_process_killed_while_it_writes_the_lock_record_leaves_one_whole(tmp_path, mocker):
    """Killed before or inside the rewrite of a longer record: the old one or the new one."""
    from d2persist.files import lock

    folder = str(tmp_path / "run")
    assert lock_run_folder(folder)
    try:
        fd, record = lock._HELD[os.path.realpath(folder)]
        record.update(started=True, ppid=os.getppid())
        lock._write_record(fd, record)
        shorter = {"host": record["host"], "pid": 1}
        for call, left in (("pwrite", record), ("ftruncate", shorter)):
            mocker.patch.object(lock.os, call, side_effect=_Killed)
            with pytest.raises(_Killed):
                lock._write_record(fd, shorter)
            mocker.stopall()
            assert read_lock_holder(folder) == left
    finally:
        unlock_run_folder(folder)


class _Sizes:
    """A dataset of dicts with a ``width``/``height`` (portrait, landscape) per index."""

    def __init__(self, n):
        self._dicts = [{"id": i, "width": 40 + 30 * (i % 3 == 0), "height": 50} for i in range(n)]

    def __len__(self):
        return len(self._dicts)

    def __getitem__(self, i):
        return self._dicts[i]


def _global_batches(world, iterations, state=None, total=4):
    """[[ids of the global batch] per iteration], and the state after, taking ``world`` slices."""
    loaders = [ResumableTrainLoader(_Sizes(23), lambda d: d["id"], total // world, seed=5,
                                    rank=r, world_size=world) for r in range(world)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    streams = [iter(loader) for loader in loaders]
    batches = [[i for s in streams for i in next(s)] for _ in range(iterations)]
    states = [loader.state_dict() for loader in loaders]
    assert all(s == states[0] for s in states)  # every process keeps the same position
    return batches, states[0]


def test_global_batches_are_the_same_for_any_world_size_and_across_a_change():
    one, state_one = _global_batches(1, 12)
    for world in (2, 4):
        assert _global_batches(world, 12) == (one, state_one)
    # one global batch is of one aspect ratio (both kinds occur)
    kinds = [{i % 3 == 0 for i in batch} for batch in one]
    assert all(len(k) == 1 for k in kinds) and {True} in kinds and {False} in kinds
    first, mid = _global_batches(2, 5)
    rest, _ = _global_batches(1, 7, state=mid)  # 2 -> 1
    assert first + rest == one
    rest, _ = _global_batches(4, 7, state=_global_batches(1, 5)[1])  # 1 -> 4
    assert first + rest == one


def test_data_state_of_an_earlier_version_is_converted():
    one = {"seed": 3, "position": 10, "buckets": [[8], []]}
    assert data_state_to_resume([{"data": one}]) is one  # one process: the same meaning
    old = [{"data": dict(one, position=p)} for p in (10, 11)]
    assert data_state_to_resume(old)["position"] == 22  # past every position drawn
    assert data_state_to_resume([]) is None


@pytest.mark.parametrize("key,value,match", [
    ("STOP_SIGNALS", ["SIGTERM", "SIGNOPE"], "SIGNOPE"),
    ("STOP_SIGNALS", ["SIGKILL"], "SIGKILL"),
    ("CHECKPOINT_MINUTES", -1.0, "-1.0"),
    ("CHECKPOINT_MINUTES", "soon", "soon"),
])
def test_bad_cluster_options_are_one_sentence(key, value, match):
    from detectron2.config import get_cfg

    from d2persist import add_persist_config
    from d2persist.runconfig import persist_options

    cfg = add_persist_config(get_cfg())
    cfg.PERSIST[key] = value
    with pytest.raises(ConfigError, match=match) as e:
        persist_options(cfg)
    assert "\n" not in str(e.value)


def test_stop_signal_names_are_normalized():
    from detectron2.config import get_cfg

    from d2persist import add_persist_config
    from d2persist.runconfig import persist_options

    cfg = add_persist_config(get_cfg())
    cfg.PERSIST.STOP_SIGNALS = ["usr1", "SIGTERM"]
    assert persist_options(cfg)["STOP_SIGNALS"] == ["SIGUSR1", "SIGTERM"]
    cfg.PERSIST.STOP_SIGNALS = ["SIGINT", "INT", "SIGABRT", "SIGIOT"]  # repeats, an alias
    assert persist_options(cfg)["STOP_SIGNALS"] == ["SIGINT", "SIGABRT"]


def test_a_lock_record_that_cannot_be_written_gives_the_lock_back(tmp_path, mocker):
    """The disk full as the holder's record is written: one sentence, and the lock is not kept
    by a descriptor nothing holds (a retry in the process was refused as another run's)."""
    import errno

    from d2persist import ArtifactError

    mocker.patch("d2persist.files.lock.os.pwrite",
                 side_effect=OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(ArtifactError, match=r"^Cannot write .*\.d2persist\.lock: No space left on "
                                            r"device\.$"):
        lock_run_folder(str(tmp_path))
    mocker.stopall()
    assert lock_run_folder(str(tmp_path))  # taken now: nothing held it
    unlock_run_folder(str(tmp_path))
