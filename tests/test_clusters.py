"""
Clusters as teams run them, with real launchers on 127.0.0.1 (gloo on the CPU): torch's own
elastic launcher (torchrun) beside detectron2's ``launch()``, a worker SIGKILLed and restarted
by torchrun, two torchrun "nodes" with their own folders, resumes with another number of
processes (the images of every iteration compared), checkpoints by time, a scheduler's
warning signal, and a second writer refused by the run lock. Every run gets a short
``--dist-timeout`` and a test timeout that kills its whole process group.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import (
    DIST_TIMEOUT,
    LAUNCH2,
    LAUNCH2_OPTS,
    ONE_THREAD,
    REPO,
    TINY_OPTS,
    TRAIN_NET,
    assert_bitwise_equal,
    free_port,
    kill_tree,
    run_tool,
    start_tool,
    tool_env,
    torchrun,
)

INSTRUMENTED = os.path.join(REPO, "tests", "scripts", "instrumented_train_net.py")
#: torchrun gives each worker OMP_NUM_THREADS=1 unless it is set; launch() does not: the same
#: threads on both sides, as a bitwise comparison needs
ENV = ONE_THREAD
TIMEOUT = DIST_TIMEOUT
OPTS = LAUNCH2_OPTS  # as the reference run's (conftest's launch2_run)
STANDALONE2 = ["--standalone", "--nproc-per-node", 2]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def _ok(res):
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return res.stdout + res.stderr


@pytest.fixture(scope="module")
def launch_run(launch2_run):
    """The reference: ``train_net.py --num-gpus 2`` under detectron2's launch()."""
    return launch2_run


def _workers(launcher_pid):
    """{RANK: pid} of the train_net.py workers below a torchrun process."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher_pid and b"RANK" in env:
            found[int(env[b"RANK"])] = int(pid)
    return found


def _popen(launcher, script, *args, cwd=REPO, env=()):
    cmd = [sys.executable, *map(str, launcher), script, *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env=tool_env(**ENV, **dict(env)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(predicate, proc, what, timeout=180):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.05)


def _tagged(out):
    """The iteration of the periodic checkpoint ``last_checkpoint`` names, or -1."""
    from d2persist.layout import checkpoint_iteration

    path = out / "last_checkpoint"
    it = checkpoint_iteration(path.read_text()) if path.is_file() else None
    return -1 if it is None else it


def _finish(proc, timeout=240):
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"did not finish in {timeout} s (a hang?)") from None
    finally:
        kill_tree(proc.pid)
        proc.wait()
    return err or ""


def test_torchrun_restarts_a_killed_worker_and_ends_bitwise(tmp_path, launch_run):
    """
    torchrun's two workers are one run, bitwise equal to launch()'s; rank 0 (the writer,
    holding the run lock) SIGKILLed mid-run, torchrun restarts both, and they resume (the EMA
    weights too).
    """
    out = tmp_path / "run"
    proc = _popen(torchrun(*STANDALONE2, "--max-restarts", 1), TRAIN_NET, *TIMEOUT, *OPTS,
                  "OUTPUT_DIR", out)
    try:
        _wait_for(lambda: _tagged(out) >= 5, proc, "checkpoint 5")
        os.kill(_workers(proc.pid)[0], signal.SIGKILL)
        err = _finish(proc)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 0, err[-4000:]
    assert "torchrun restart 1: resuming" in err
    log = (out / "log.txt").read_text()
    # torchrun's workers are one run, not two of size 1: one main process and its rank 1
    assert "Rank of current process: 0. World size: 2" in log
    assert "World size: 2" in (out / "log.txt.rank1").read_text()
    assert log.count("Starting training from iteration 0") == 1
    assert "Starting training from iteration " in log.split("Starting training from iteration 0")[1]
    assert_bitwise_equal(_weights(launch_run / "model_final.pth"),
                         _weights(out / "model_final.pth"))
    ref_ema, ema = (torch.load(p / "model_final.pth", weights_only=True)["trainer"]["hooks"][
        "PersistHook"]["ema"] for p in (launch_run, out))
    assert ref_ema["updates"] == ema["updates"] == 16
    assert_bitwise_equal(ref_ema["model"], ema["model"])


def test_a_restart_does_not_resume_a_run_its_job_was_refused(tmp_path, launch_run):
    """A new run (no --resume) into an earlier run's folder is refused on every attempt."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(launch_run, out)
    before = (out / "model_final.pth").read_bytes()
    res = run_tool(TRAIN_NET, *TIMEOUT, *OPTS, "OUTPUT_DIR", out, env=ENV, timeout=240,
                   launcher=torchrun(*STANDALONE2, "--max-restarts", 1))
    assert res.returncode != 0
    assert res.stderr.count("already holds checkpoints of an earlier run") >= 2  # both attempts
    assert "resuming" not in res.stderr
    assert (out / "model_final.pth").read_bytes() == before


def test_two_torchrun_nodes_with_their_own_folders(tmp_path, launch_run):
    port = free_port()
    procs = []
    try:
        for node in (0, 1):
            cwd = tmp_path / f"node{node}"
            cwd.mkdir()
            procs.append(_popen(
                torchrun("--nnodes", 2, "--node-rank", node, "--nproc-per-node", 1,
                         "--master-addr", "127.0.0.1", "--master-port", port),
                TRAIN_NET, *TIMEOUT, *OPTS, "OUTPUT_DIR", "out", cwd=cwd,  # relative: its own
            ))
        errors = [_finish(p) for p in procs]
    finally:
        for p in procs:
            kill_tree(p.pid)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for e in errors)
    main, other = tmp_path / "node0" / "out", tmp_path / "node1" / "out"
    assert_bitwise_equal(_weights(launch_run / "model_final.pth"),
                         _weights(main / "model_final.pth"))
    assert not [n for n in os.listdir(other) if n.endswith(".pth")]  # one writer
    assert "World size: 2" in (other / "log.txt.rank1").read_text()


def _batches(out):
    """{iteration: [ids of rank 0, ids of rank 1, ...]}, the last record of each iteration."""
    ranks = sorted(out.glob("batches.rank*.jsonl"))
    found = {}
    for r, path in enumerate(ranks):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            found.setdefault(rec["iter"], {})[r] = rec["ids"]
    return {it: [v[r] for r in sorted(v)] for it, v in found.items()}


def _global(batches):
    return {it: [i for ids in per_rank for i in ids] for it, per_rank in batches.items()}


def _record(out, procs, *extra, stop_at=None):
    launch = ["--num-gpus", procs, "--dist-url", "auto", *TIMEOUT]
    opts = [*TINY_OPTS, "SOLVER.MAX_ITER", 8, "SOLVER.CHECKPOINT_PERIOD", 100,
            "PERSIST.EXPORT", False, "PERSIST.STOP_SIGNALS", "['SIGINT','SIGTERM','SIGUSR1']",
            "OUTPUT_DIR", out]
    env = dict(ENV, STOP_AT=str(stop_at)) if stop_at is not None else ENV
    return run_tool(INSTRUMENTED, *launch, *extra, *opts, env=env, timeout=240)


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """Uninterrupted recorded runs with 1 and 2 processes: ``{1: folder, 2: folder}``."""
    runs = {n: tmp_path_factory.mktemp(f"straight{n}") / "run" for n in (1, 2)}
    for n, out in runs.items():
        _ok(_record(out, n))
    return runs


def test_global_batches_do_not_depend_on_the_world_size(straight_runs):
    one, two = (_batches(straight_runs[n]) for n in (1, 2))
    assert sorted(one) == list(range(8)) and all(len(v) == 1 for v in one.values())
    assert all(len(v) == 2 for v in two.values())
    assert _global(two) == _global(one)  # rank r takes slice r of the same global batch
    assert len({i for ids in _global(one).values() for i in ids}) == 16  # 8 x 2 images


def test_resume_with_another_world_size_sees_the_same_images(tmp_path, straight_runs):
    """The images of each iteration's global batch across a 2 -> 1 and then a 1 -> 2 resume."""
    two = straight_runs[2]
    straight = _global(_batches(two))

    out = tmp_path / "changed"
    stopped = _record(out, 2, stop_at=3)  # SIGUSR1 to the last process, after iteration 3
    assert stopped.returncode == 128 + signal.SIGUSR1, stopped.stderr[-3000:]
    assert (out / "last_checkpoint").read_text() == "model_0000003.pth"
    for first, then, stop_at, start in ((2, 1, 5, 4), (1, 2, None, 6)):
        res = _record(out, then, "--resume", stop_at=stop_at)
        if stop_at is not None:
            assert res.returncode == 128 + signal.SIGUSR1, res.stderr[-3000:]
            assert (out / "last_checkpoint").read_text() == "model_0000005.pth"
        log = _ok(res) if stop_at is None else res.stdout + res.stderr
        assert f"Starting training from iteration {start}" in log
        assert f"The checkpoint was written by {first} processes, this run has {then}" in log
    assert _global(_batches(out)) == straight  # no image skipped or seen twice
    ckpt, ref = (torch.load(o / "model_final.pth", weights_only=True) for o in (out, two))
    assert ckpt["iteration"] == 7
    assert ckpt["trainer"]["hooks"]["LRScheduler"] == ref["trainer"]["hooks"]["LRScheduler"]


def test_checkpoint_minutes_agree_across_processes(tmp_path):
    out = tmp_path / "run"
    _ok(run_tool(TRAIN_NET, *LAUNCH2, *TINY_OPTS, "SOLVER.MAX_ITER", 12,
                 "SOLVER.CHECKPOINT_PERIOD", 1000, "PERSIST.CHECKPOINT_MINUTES", 0.003,
                 "PERSIST.EXPORT", False, "OUTPUT_DIR", out, env=ENV, timeout=240))
    said = "(PERSIST.CHECKPOINT_MINUTES)"

    def timed(log):
        return [int(ln.split("checkpoint after iteration ")[1].split()[0])
                for ln in log.read_text().splitlines() if said in ln]

    main = timed(out / "log.txt")
    assert len(main) >= 2, main  # 0.18 s between saves: several in 12 iterations
    assert timed(out / "log.txt.rank1") == main  # the main process's clock decided for both
    periodic = sorted(int(n[6:13]) for n in os.listdir(out)
                      if n.startswith("model_0") and n.endswith(".pth"))
    assert set(main) <= set(periodic)


def test_stop_signal_to_torchrun_saves_once_and_does_not_restart(tmp_path):
    """SIGUSR1 to torchrun (told to forward it): one checkpoint, no restart, then resumable."""
    out = tmp_path / "run"
    args = [*TIMEOUT, *TINY_OPTS, "SOLVER.MAX_ITER", 300, "SOLVER.CHECKPOINT_PERIOD", 100,
            "PERSIST.EXPORT", False, "PERSIST.STOP_SIGNALS", "['SIGINT','SIGTERM','SIGUSR1']"]
    proc = _popen(torchrun(*STANDALONE2, "--max-restarts", 2,
                           "--signals-to-handle", "SIGTERM,SIGINT,SIGUSR1"),
                  TRAIN_NET, *args, "OUTPUT_DIR", out)
    try:
        log = out / "log.txt"
        _wait_for(lambda: log.is_file() and " iter: 19 " in log.read_text(), proc, "training")
        proc.send_signal(signal.SIGUSR1)
        err = _finish(proc)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode != 0, err[-3000:]
    text = log.read_text()
    assert text.count("Starting training from iteration") == 1, "torchrun restarted the run"
    assert "Received SIGUSR1" in text
    names = sorted(n for n in os.listdir(out) if n.endswith(".pth"))
    assert len(names) == 1 and names[0] != "model_final.pth", names
    it = torch.load(out / names[0], weights_only=True)["iteration"]
    assert 19 <= it < 299
    # resumable (here by one process: torchrun's resumes are the restart test's and the
    # world-size test's)
    more = _ok(run_tool(TRAIN_NET, "--resume", *args[:-2], "SOLVER.MAX_ITER", it + 3,
                        "OUTPUT_DIR", out, env=ENV, timeout=240))
    assert f"Starting training from iteration {it + 1}" in more


def test_a_second_writer_is_refused_and_the_first_is_undisturbed(tmp_path):
    opts = [*TINY_OPTS, "SOLVER.MAX_ITER", 8, "SOLVER.CHECKPOINT_PERIOD", 2,
            "PERSIST.EXPORT", False]
    _ok(run_tool(TRAIN_NET, *opts, "OUTPUT_DIR", tmp_path / "ref", env=ENV))
    out, gate = tmp_path / "run", tmp_path / "go-on"
    # the first run waits as iteration 4 begins (checkpoint 3 written) until the gate opens
    first = start_tool(INSTRUMENTED, *opts, "OUTPUT_DIR", out,
                       env=dict(ENV, HOLD_AT="4", HOLD_UNTIL=str(gate)))
    try:
        _wait_for(lambda: _tagged(out) == 3, first, "checkpoint 3")
        log_before = (out / "log.txt").read_bytes()
        for extra in (["--resume"], ["--num-gpus", 2, "--dist-url", "auto", *TIMEOUT]):
            second = run_tool(TRAIN_NET, *extra, *opts, "OUTPUT_DIR", out, env=ENV)
            assert second.returncode == 2, second.stderr[-3000:]
            assert "Traceback" not in second.stderr
            # (under launch() each process says it; torch then notes it stopped the other)
            line = next(ln for ln in second.stderr.splitlines()
                        if ln.startswith("train_net.py: error:"))
            assert "is being written by another training run" in line
            assert f"pid {first.pid}," in line and "since 20" in line
        assert (out / "log.txt").read_bytes() == log_before  # the refused wrote not a line
        # readers never take the lock
        evaluated = run_tool(TRAIN_NET, "--eval-only", "--resume", *opts, "OUTPUT_DIR", out,
                             env=ENV)
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        listed = run_tool("-m", "d2persist", "ls", out, "--verify", env=ENV)  # a run in training
        assert listed.returncode == 0 and "model_0000003.pth" in listed.stdout, listed.stderr
        verified = run_tool("-m", "d2persist", "verify", out, env=ENV)
        assert verified.returncode == 0, verified.stdout + verified.stderr[-2000:]
        assert first.poll() is None
        gate.touch()
        err = _finish(first)
    finally:
        kill_tree(first.pid)
    assert first.returncode == 0, err[-3000:]
    assert (out / "log.txt").read_text().count("Starting training from iteration") == 1
    assert_bitwise_equal(_weights(tmp_path / "ref" / "model_final.pth"),
                         _weights(out / "model_final.pth"))
