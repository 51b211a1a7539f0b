import logging
import os
import sys

import pytest

_OWN_CACHE = []  # the cache folder this session made, if any


def pytest_configure(config):
    # A cache private to this test session, shared with the tools the tests start.
    if "D2PERSIST_CACHE" not in os.environ:
        import tempfile

        os.environ["D2PERSIST_CACHE"] = tempfile.mkdtemp(prefix="d2persist-test-cache-")
        _OWN_CACHE.append(os.environ["D2PERSIST_CACHE"])
    logging.getLogger("d2persist").setLevel(logging.INFO)


#: ``make test`` runs the suite in two pytest-xdist workers (``-n 2 --dist loadgroup``, one
#: thread per process): each file is one group, run whole in one worker, except the files that
#: share a costly session fixture's run, which run together so that it is made once (the
#: 6-iteration ``trained_run`` is made in each worker that needs it)
_GROUPS = {"test_default_schedule": "default_run", "test_runview": "default_run",
           "test_predict_batch": "default_run", "test_serve": "default_run",
           "test_clusters": "launch2_run", "test_machines": "launch2_run"}
#: the groups that take longest, first (xdist hands groups out in this order): the workers end
#: together instead of one waiting on the other's last long file
_LONGEST_FIRST = ["default_run", "launch2_run", "test_families", "test_distributed",
                  "test_resume", "test_mirror", "test_early_stop"]


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    groups = {}
    for item in items:
        stem = item.path.stem
        groups[item] = _GROUPS.get(stem, stem)
        item.add_marker(pytest.mark.xdist_group(groups[item]))
    first = {g: i for i, g in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(groups[item], len(first)))  # (stable)


def pytest_unconfigure(config):
    from helpers import stop_fork_server

    stop_fork_server()
    # every session made its own cache: without this, each left ~7 MB behind in the temp folder
    import shutil

    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE.pop(), ignore_errors=True)
        del os.environ["D2PERSIST_CACHE"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One tiny completed run (PersistTrainer), shared by the tests that only read it."""
    from helpers import tiny_cfg, train

    out = tmp_path_factory.mktemp("trained_run")
    train(tiny_cfg(out))
    return out


@pytest.fixture(scope="session")
def launch2_run(tmp_path_factory):
    """
    The multi-process reference: ``tools/train_net.py --num-gpus 2`` under detectron2's
    launch(), one thread per process, :data:`helpers.LAUNCH2_OPTS` (16 iterations, a checkpoint
    every 2, no export). Runs of 8 iterations compare with its ``model_0000007.pth``: the
    schedule of TINY_OPTS (2 warm-up iterations, no steps) does not depend on MAX_ITER.
    """
    from helpers import LAUNCH2, LAUNCH2_OPTS, ONE_THREAD, TRAIN_NET, run_tool

    out = tmp_path_factory.mktemp("launch2") / "run"
    res = run_tool(TRAIN_NET, *LAUNCH2, *LAUNCH2_OPTS, "OUTPUT_DIR", out, env=ONE_THREAD,
                   timeout=240)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return out


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """
    The built-in default config through tools/train_net.py, shortened to 40 iterations with an
    evaluation at 19 and at the end on the quick val split (the val split's first 10 images),
    exporting ONNX and INT8 (within a budget of 5 AP points): ``(run folder,
    CompletedProcess)``.
    """
    from helpers import TRAIN_NET, run_tool

    out = tmp_path_factory.mktemp("default") / "run"
    res = run_tool(
        TRAIN_NET, "OUTPUT_DIR", out, "SOLVER.MAX_ITER", 40, "SOLVER.STEPS", "(30,)",
        "SOLVER.WARMUP_ITERS", 10, "TEST.EVAL_PERIOD", 20, "SOLVER.CHECKPOINT_PERIOD", 20,
        # INT8 on 10 images moves the AP by more than the default budget of 1 point: the
        # all-layers model is kept here, and test_default_schedule.py adapts it on purpose
        "DATASETS.TEST", "('shapes_val_10',)", "PERSIST.INT8_BUDGET", 5.0,
        "PERSIST.EXPORT_FORMATS", "['safetensors', 'onnx', 'onnx-int8']", timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


# tests.scripts.* (a project's config extension) must import however pytest is started
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
