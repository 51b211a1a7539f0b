"""The module graph reads as layers: each module imports only modules of lower layers."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "d2persist")

#: module -> layer, as README.rst's Layout table and ARCHITECTURE.md draw them
LAYERS = {
    "errors": 0,
    "layout": 0,
    "config": 1,
    "collective": 1,
    "files.writer": 1,
    "files.atomic": 1,
    "files.safe_load": 1,
    "files.cache": 1,
    "files.lock": 2,
    "files.mirror": 2,
    "runconfig": 3,
    "data.shapes": 3,
    "artifacts.folders": 4,
    "artifacts.problems": 4,
    "artifacts.bundle": 5,
    "artifacts.checkpoints": 5,
    "artifacts.view": 6,
    "artifacts.describe": 7,
    "artifacts.manifest": 7,
    "artifacts.plot": 7,
    "artifacts.resolve": 8,
    "predict.images": 9,
    "predict.outputs": 9,
    "predict.rebuild": 9,
    "predict.evaluate": 9,
    "predict.onnx_predictor": 10,
    "predict.predictor": 10,
    "predict.infer": 10,
    "predict.load": 11,
    "export.onnx_graph": 12,
    "export.quantize": 12,
    "export.bundle": 13,
    "export.self_eval": 14,
    "scale.ray_nodes": 15,
    "scale.batch": 16,
    "scale.serve": 16,
    "training.state": 17,
    "training.best": 17,
    "training.resume": 17,
    "training.ema": 17,
    "training.actions": 18,
    "training.checkpointer": 18,
    "training.validation": 18,
    "training.before_eval": 19,
    "training.hook": 20,
    "training.trainer": 21,
    "training.lazy_trainer": 22,
    "cli": 23,
    "__main__": 24,
}

#: the subpackages, lowest first: each holds one band of layers, below the next one's
SUBPACKAGES = ("files", "artifacts", "predict", "export", "scale", "training")


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


def test_subpackages_read_as_bands_of_layers():
    """The file list shows the design: files < artifacts < predict < export < scale < training."""
    bands = [[layer for m, layer in LAYERS.items() if m.startswith(p + ".")] for p in SUBPACKAGES]
    for lower, upper, (a, b) in zip(bands, bands[1:], zip(SUBPACKAGES, SUBPACKAGES[1:])):
        assert max(lower) < min(upper), (a, max(lower), b, min(upper))


def test_readme_layout_table_is_this_one():
    """README.rst's Layout table is the truth the team reads: it must say what LAYERS says."""
    import re

    readme = os.path.join(os.path.dirname(PACKAGE), "README.rst")
    rows = re.findall(r"^(\d+)\s+``d2persist/(\S+)\.py``", open(readme, encoding="utf-8").read(),
                      flags=re.M)
    assert {m.replace("/", "."): int(layer) for layer, m in rows} == LAYERS


def test_public_api_is_listed_once_everywhere():
    """``__all__``, the lazy table and the editors' imports name the same public API."""
    import d2persist

    init = os.path.join(PACKAGE, "__init__.py")
    tree = ast.parse(open(init, encoding="utf-8").read())
    typed = {alias.asname or alias.name for node in ast.walk(tree)
             if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
             for sub in node.body if isinstance(sub, ast.ImportFrom) for alias in sub.names}
    assert set(d2persist.__all__) - {"__version__"} == set(d2persist._EXPORTS) == typed
