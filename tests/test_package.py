"""The package itself: its public API, and the message when detectron2 is missing."""

import subprocess
import sys

import d2persist
from helpers import REPO


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


def test_onnx_prediction_modules_import_no_torch():
    code = ("import sys, d2persist, d2persist.load, d2persist.onnx_predictor, d2persist.infer; "
            "d2persist.load_predictor; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', "
            "'detectron2', 'cv2', 'pycocotools'}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"


def test_prediction_does_not_import_the_training_engine():
    code = ("import sys, d2persist.predictor, d2persist.infer; "
            "print(sorted(m for m in sys.modules if m.startswith(('detectron2.engine', "
            "'detectron2.evaluation', 'd2persist.hook', 'd2persist.trainer'))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"
