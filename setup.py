#!/usr/bin/env python
"""d2persist: persist detectron2 training runs for exact resume and faithful prediction."""

import os
import re

from setuptools import find_packages, setup


def get_version():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "d2persist", "__init__.py")
    with open(path, encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


setup(
    name="d2persist",
    version=get_version(),
    description=__doc__.strip(),
    packages=find_packages(exclude=("tests", "tests.*", "tools", "bench")),
    package_data={"d2persist": ["py.typed"]},
    license="Apache-2.0",
    python_requires=">=3.10",
    # detectron2 is not on PyPI: the Makefile installs it from its repository (see README).
    install_requires=[
        "torch",
        "torchvision",
        "pyyaml",
        "opencv-python",
        "safetensors",
        "tqdm",
        "numpy",
        "Pillow",
        "fsspec",
        # detectron2's model_zoo (get_config_file, the usual first line of a detectron2 script)
        # imports pkg_resources, which setuptools removed in version 81
        "setuptools<81",
    ],
    extras_require={
        # (pytest-xdist 3.8: make test's --no-loadscope-reorder)
        "test": ["pytest", "pytest-mock", "pytest-xdist>=3.8", "flake8", "mypy", "sphinx",
                 "pycocotools", "s3fs", "moto[server]", "ray[data,serve]>=2.9"],
        # PERSIST.EXPORT_FORMATS "onnx" and load_predictor(..., backend="onnxruntime")
        "onnx": ["onnx", "onnxruntime"],
        # PERSIST.MIRROR to S3 (other stores: their fsspec package, e.g. gcsfs, adlfs)
        "s3": ["s3fs"],
        # d2persist predict --ray (Ray Data) and d2persist serve (Ray Serve)
        "ray": ["ray[data,serve]>=2.9"],
    },
    # d2persist ls / verify RUN (also python -m d2persist)
    entry_points={"console_scripts": ["d2persist=d2persist.__main__:main"]},
)
