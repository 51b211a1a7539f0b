"""The package itself: its public API, and the message when detectron2 is missing."""

import subprocess
import sys

import pytest
from helpers import REPO

import d2persist


def test_public_api_is_importable():
    for name in d2persist.__all__:
        assert getattr(d2persist, name) is not None, name


def test_without_detectron2_training_names_say_how_to_install_it():
    code = ("import sys; sys.modules['detectron2'] = None; import d2persist; "
            "d2persist.load_predictor; d2persist.OnnxPredictor; d2persist.PersistHook")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert "d2persist needs detectron2" in last and "INSTALL.md" in last
    assert "backend='onnxruntime'" in last


def _loaded(statement, watched):
    """The modules under the prefixes ``watched`` a fresh interpreter holds after ``statement``."""
    code = (f"import sys; {statement}; "
            f"print(sorted(m for m in sys.modules if m.startswith({tuple(watched)!r})))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip()


def test_onnx_prediction_modules_import_no_torch():
    statement = ("import d2persist, d2persist.predict, d2persist.predict.load, "
                 "d2persist.predict.onnx_predictor, d2persist.predict.infer, "
                 "d2persist.artifacts, d2persist.files, d2persist.scale, d2persist.__main__; "
                 "d2persist.load_predictor, d2persist.predict_source")
    assert _loaded(statement, ["torch", "detectron2", "cv2", "pycocotools", "ray"]) == "[]"


def test_prediction_does_not_import_the_training_engine():
    statement = "import d2persist.predict.predictor, d2persist.predict.infer"
    assert _loaded(statement, ["detectron2.engine", "detectron2.evaluation",
                               "d2persist.training", "d2persist.export"]) == "[]"


def test_export_does_not_import_training_code():
    watched = ["detectron2.engine", "d2persist.training"]
    assert _loaded("import d2persist.export", watched) == "[]"


@pytest.mark.parametrize("tool", ["train_net.py", "lazyconfig_train_net.py"])
def test_training_tools_without_detectron2_say_how_to_install_it(tool):
    code = ("import runpy, sys; sys.modules['detectron2'] = None; "
            f"sys.argv = ['{tool}', '--help']; "
            f"runpy.run_path('tools/{tool}', run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode != 0
    assert "d2persist needs detectron2" in res.stderr.strip().splitlines()[-1], res.stderr[-2000:]
