"""The public API is typed: every public function and method is fully annotated."""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "d2persist")

#: the methods of a public class that are public although their names start with "_"
PUBLIC_DUNDERS = ("__init__", "__call__")


def _public_names(tree):
    """The module's ``__all__``, or None if it has none (then nothing in it is public)."""
    public = None
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and getattr(target, "id", "") == "__all__":
            try:
                public = set(ast.literal_eval(node.value))
            except ValueError:  # a computed __all__ would hide the public API from this check
                raise AssertionError("__all__ must be a literal list of names") from None
    return public


def _unannotated(fn):
    """The parameters of ``fn`` (not self/cls) without an annotation, and "return" if it has
    none (``__init__`` needs none)."""
    args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
    if args and args[0].arg in ("self", "cls"):
        args = args[1:]
    bad = [a.arg for a in args if a.annotation is None]
    if fn.args.vararg is not None and fn.args.vararg.annotation is None:
        bad.append("*" + fn.args.vararg.arg)
    if fn.args.kwarg is not None and fn.args.kwarg.annotation is None:
        bad.append("**" + fn.args.kwarg.arg)
    if fn.returns is None and fn.name != "__init__":
        bad.append("return")
    return bad


def _public_functions():
    """(where, function node) of every public function and method of the package."""
    found = []
    for root, _, names in os.walk(PACKAGE):
        for name in sorted(names):
            # the package's own __init__ re-exports lazily: it defines no public function
            if not name.endswith(".py") or (name == "__init__.py" and root == PACKAGE):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, os.path.dirname(PACKAGE))
            tree = ast.parse(open(path, encoding="utf-8").read())
            public = _public_names(tree)
            if public is None:
                continue
            functions = (ast.FunctionDef, ast.AsyncFunctionDef)
            for node in tree.body:
                if isinstance(node, functions) and node.name in public:
                    found.append((f"{rel}:{node.lineno} {node.name}", node))
                if isinstance(node, ast.ClassDef) and node.name in public:
                    for m in node.body:
                        if isinstance(m, functions) and (
                            not m.name.startswith("_") or m.name in PUBLIC_DUNDERS
                        ):
                            found.append((f"{rel}:{m.lineno} {node.name}.{m.name}", m))
    return found


def test_the_check_sees_the_public_api():
    """A check that found nothing to check would pass for nothing."""
    where = {w.split(" ", 1)[1] for w, _ in _public_functions()}
    assert {"read_manifest", "RunView.__init__", "Predictor.__call__",
            "PersistHook.after_step"} <= where


def test_every_public_function_is_annotated():
    missing = [f"{where}: {bad}" for where, fn in _public_functions()
               for bad in [_unannotated(fn)] if bad]
    assert not missing, (
        f"{len(missing)} public function(s) lack annotations (parameter names, 'return'); "
        "annotate them (mypy checks the bodies of annotated functions):\n" + "\n".join(missing)
    )
