"""The module graph reads as layers: each module imports only modules of lower layers."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "d2persist")

#: module -> layer, as README.rst's layout table and ARCHITECTURE.md draw them
LAYERS = {
    "errors": 0,
    "layout": 0,
    "config": 1,
    "fileio": 1,
    "async_writer": 1,
    "resume": 1,
    "imageio": 1,
    "outputs": 1,
    "best": 2,
    "storage": 2,
    "runconfig": 2,
    "manifest": 4,
    "data.shapes": 2,
    "checkpoint": 4,
    "rebuild": 3,
    "onnx_export": 3,
    "quantize": 3,
    "onnx_predictor": 5,
    "export": 5,
    "artifacts": 5,
    "runview": 3,
    "predictor": 6,
    "plot": 4,
    "bundle_eval": 7,
    "load": 7,
    "infer": 7,
    "evaluate": 7,
    "hook": 8,
    "trainer": 9,
    "lazy_trainer": 10,
    "cli": 11,
    "__main__": 12,
}


def _modules():
    found = []
    for root, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py") and name != "__init__.py":
                rel = os.path.relpath(os.path.join(root, name), PACKAGE)[:-3]
                found.append(rel.replace(os.sep, "."))
    return sorted(found)


def _imports(module):
    """d2persist modules imported by ``module`` anywhere in it (function-level imports too)."""
    path = os.path.join(PACKAGE, *module.split(".")) + ".py"
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = module.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("d2persist."):
                target = node.module[len("d2persist."):]
            else:
                continue
            # "from . import x" / "from .data import shapes" name modules too
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                out.add(sub if sub in LAYERS else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("d2persist."):
                    out.add(alias.name[len("d2persist."):])
    return {m for m in out if m}


def test_every_module_has_a_layer():
    assert _modules() == sorted(LAYERS)


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_module_imports_only_lower_layers(module):
    upward = {m: LAYERS.get(m) for m in _imports(module)
              if m != "" and LAYERS.get(m, 99) >= LAYERS[module]}
    assert not upward, f"{module} (layer {LAYERS[module]}) imports {upward}"


def test_readme_layout_table_is_this_one():
    """README.rst's Layout table is the truth the team reads: it must say what LAYERS says."""
    import re

    readme = os.path.join(os.path.dirname(PACKAGE), "README.rst")
    rows = re.findall(r"^(\d+)\s+``d2persist/(\S+)\.py``", open(readme, encoding="utf-8").read(),
                      flags=re.M)
    assert {m.replace("/", "."): int(layer) for layer, m in rows} == LAYERS
