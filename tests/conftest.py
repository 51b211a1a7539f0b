import logging
import os

import pytest


def pytest_configure(config):
    # A cache private to this test session, shared with the tools the tests start.
    if "D2PERSIST_CACHE" not in os.environ:
        import tempfile

        os.environ["D2PERSIST_CACHE"] = tempfile.mkdtemp(prefix="d2persist-test-cache-")
    logging.getLogger("d2persist").setLevel(logging.INFO)


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
