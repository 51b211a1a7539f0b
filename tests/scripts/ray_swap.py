"""
Fault injection for ``d2persist predict --ray`` from a bundle's URL: the bundle there is
replaced by another (a new export, as a nightly job writes it) once the driver has described
it, before the actors load it. The command's own code runs otherwise.
"""


def _swap(url):
    """A new export at ``url``: its ONNX model another (its INT8 one), the manifest to match."""
    import hashlib
    import json

    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    data = fs.cat_file(f"{path}/model.int8.onnx")
    manifest = json.loads(fs.cat_file(f"{path}/manifest.json"))
    manifest["files"]["model.onnx"].update(sha256=hashlib.sha256(data).hexdigest(),
                                           size=len(data))
    fs.pipe_file(f"{path}/model.onnx", data)
    fs.pipe_file(f"{path}/manifest.json", json.dumps(manifest).encode())


def main(argv):
    """``ray_swap.py PREDICT-ARGS...``: ``d2persist predict PREDICT-ARGS``, the bundle at its
    ``--artifacts`` URL replaced after the driver read it; exits as the command does."""
    import d2persist.predict.load as load
    from d2persist.__main__ import main as d2persist

    describe = load.describe_predictor
    url = argv[argv.index("--artifacts") + 1]

    def described_then_swapped(*args, **kwargs):
        spec = describe(*args, **kwargs)
        _swap(url)
        return spec

    load.describe_predictor = described_then_swapped  # (predict imports it when it runs)
    return d2persist(["predict", *argv])


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
