"""Sphinx configuration: ``make docs`` builds the pages under docs/ and the API reference."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

project = "d2persist"
author = "the d2persist authors"
copyright = "2026, the d2persist authors"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Google-style Args:/Returns:, as detectron2 and fvcore write them
    "sphinx.ext.viewcode",
]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# the package imports these only where it needs them; the API pages must build without a GPU
autodoc_mock_imports = []

root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path = []
nitpicky = False
