"""The package itself: its public API, and the message when detectron2 is missing."""

import subprocess
import sys

import d2persist
from helpers import REPO


def test_public_api_is_importable():
    for name in d2persist.__all__:
        assert getattr(d2persist, name) is not None, name


def test_import_without_detectron2_says_how_to_install_it():
    code = "import sys; sys.modules['detectron2'] = None; import d2persist"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert "d2persist needs detectron2" in last and "INSTALL.md" in last


def test_prediction_does_not_import_the_training_engine():
    code = ("import sys, d2persist.predictor, d2persist.infer; "
            "print(sorted(m for m in sys.modules if m.startswith(('detectron2.engine', "
            "'detectron2.evaluation', 'd2persist.hook', 'd2persist.trainer'))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"
