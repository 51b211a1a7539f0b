# d2persist: `make demo` sets up and runs the main job; `make test` runs the whole suite.
# Both install what is missing into the active Python (python3 -m pip, as detectron2's own
# instructions do). For isolation, activate a virtual environment first.

PYTHON ?= python3
PIP := $(PYTHON) -m pip
# detectron2 is not on PyPI: it is installed from its repository, as its INSTALL.md says.
DETECTRON2_SRC ?= git+https://github.com/facebookresearch/detectron2.git
# panopticapi (detectron2's COCOPanopticEvaluator, tools/evaluate.py --panoptic-json) is not on
# PyPI either: installed from its repository, as its README says.
PANOPTICAPI_SRC ?= git+https://github.com/cocodataset/panopticapi.git
DEMO_OUT ?= output/shapes
# when make started (for the demo's total time)
DEMO_START := $(shell date +%s)

.PHONY: install install-torch install-detectron2 install-panopticapi install-test \
	check-detectron2 typecheck docs test test-fast \
	demo lint bench help

help:
	@echo "make demo       install, train the built-in model on CPU, evaluate, export (also"
	@echo "                ONNX and INT8), evaluate the export per backend, predict with"
	@echo "                PyTorch and with ONNX Runtime"
	@echo "make test       install what the tests need, lint, mypy, build the docs, and run the"
	@echo "                whole suite"
	@echo "make test-fast  lint, mypy and the unit tests that train nothing (under 30 s)"
	@echo "make lint       flake8 with detectron2's settings (line length 100)"
	@echo "make typecheck  mypy on the package (settings in setup.cfg)"
	@echo "make docs       the documentation (Sphinx, warnings as errors) in docs/_build/html"

install-torch:
	@# torchvision's compiled ops load only with the standard PyPI torch build
	@$(PYTHON) -c "import torch, torchvision.ops; torchvision.ops.nms" 2>/dev/null \
	  || $(PIP) install --upgrade torch torchvision

install-detectron2: install-torch
	@$(PYTHON) -c "import detectron2" 2>/dev/null \
	  || $(PIP) install --no-build-isolation '$(DETECTRON2_SRC)'

# The editable install of this checkout with its ONNX extra; pip runs (about 10 s) only when it
# is missing, points at another checkout, or setup.py/setup.cfg changed since it was made.
install: install-detectron2
	@(cd / && $(PYTHON) -c "import os, sys, d2persist, onnx, onnxruntime; \
	  sys.exit(os.path.dirname(d2persist.__file__) != os.path.join('$(CURDIR)', 'd2persist'))") \
	  2>/dev/null && [ d2persist.egg-info -nt setup.py ] && [ d2persist.egg-info -nt setup.cfg ] \
	  || $(PIP) install -q -e '.[onnx]'

install-panopticapi:
	@$(PYTHON) -c "import panopticapi.evaluation" 2>/dev/null \
	  || $(PIP) install --no-build-isolation '$(PANOPTICAPI_SRC)'

install-test: install install-panopticapi
	@$(PYTHON) -c "import sys, pytest, pytest_mock, xdist, flake8, mypy, sphinx, pycocotools, onnx, \
	  onnxruntime, s3fs, moto.server, flask_cors, ray.data; \
	  sys.exit(tuple(map(int, xdist.__version__.split('.')[:2])) < (3, 8))" 2>/dev/null \
	  || $(PIP) install -q -e '.[test,onnx]'

lint: install-test
	$(PYTHON) -m flake8 d2persist tools tests bench

check-detectron2:
	@$(PYTHON) -c "import detectron2, torchvision.ops; from detectron2 import _C" 2>/dev/null \
	  || { echo "make test: detectron2 (with its compiled ops) cannot be imported;" \
	       "install it from its repository as its INSTALL.md says (make install-detectron2)." >&2; \
	       exit 1; }

typecheck: install-test
	$(PYTHON) -m mypy

docs: install-test
	$(PYTHON) -m sphinx -W --keep-going -q -b html docs docs/_build/html

# Two pytest-xdist workers, one thread per process (as torchrun gives its workers): the files
# are grouped and ordered in tests/conftest.py; docs/development.rst says why and what it saves.
test: lint typecheck docs check-detectron2
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder tests

test-fast: lint typecheck check-detectron2
	$(PYTHON) -m pytest -q tests/unit

demo: install
	$(PYTHON) tools/train_net.py --resume OUTPUT_DIR $(DEMO_OUT)
	$(PYTHON) tools/infer_single.py --artifacts $(DEMO_OUT) \
	  --image "$$($(PYTHON) -m d2persist.data.shapes --held-out-image)" \
	  --output $(DEMO_OUT)/demo/prediction.png --json $(DEMO_OUT)/demo/prediction.json
	$(PYTHON) tools/infer_single.py --artifacts $(DEMO_OUT) --backend onnxruntime \
	  --image "$$($(PYTHON) -m d2persist.data.shapes --held-out-image)" \
	  --output $(DEMO_OUT)/demo/prediction_onnx.png --json $(DEMO_OUT)/demo/prediction_onnx.json
	@$(PYTHON) tools/demo_summary.py $(DEMO_OUT) --started $(DEMO_START)

bench: install
	$(PYTHON) bench/run_all.py --quick
