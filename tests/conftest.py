import logging
import os

import pytest


_OWN_CACHE = []


def pytest_configure(config):
    # A cache private to this test session, shared with the tools the tests start.
    if "D2PERSIST_CACHE" not in os.environ:
        import tempfile

        os.environ["D2PERSIST_CACHE"] = tempfile.mkdtemp(prefix="d2persist-test-cache-")
        _OWN_CACHE.append(os.environ["D2PERSIST_CACHE"])
    logging.getLogger("d2persist").setLevel(logging.INFO)


def pytest_unconfigure(config):
    # every session made its own cache: without this, each left ~7 MB behind in the temp folder
    import shutil

    for folder in _OWN_CACHE:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop("D2PERSIST_CACHE", None)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One tiny completed run (PersistTrainer), shared by the tests that only read it."""
    from d2persist import PersistTrainer
    from helpers import tiny_cfg

    out = tmp_path_factory.mktemp("trained_run")
    cfg = tiny_cfg(out)
    trainer = PersistTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return out
