#!/usr/bin/env python
"""
Add a portable model to the export bundle of an existing run (detectron2's tool name).

    python tools/export_model.py --artifacts output/shapes --format onnx

--artifacts is a run folder (its export is used) or an export bundle. model.onnx is written
atomically next to the bundle's weights and the manifest is updated once it is complete. Exit
code 2, with one line on stderr, for bad input, bad artifacts or a model the exporter cannot
handle.
"""

import argparse

PROG = "export_model.py"


def get_parser():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--artifacts", required=True, help="a training OUTPUT_DIR or its export")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="(default: onnx)")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    from d2persist.cli import exit_on_known_errors

    @exit_on_known_errors(PROG)
    def run():
        import os
        import time

        from d2persist.errors import ArtifactError
        from d2persist.export import add_onnx
        from d2persist.layout import ONNX_NAME
        from d2persist.manifest import find_bundle
        from d2persist.predictor import load_predictor

        bundle = find_bundle(args.artifacts) if os.path.isdir(args.artifacts) else None
        if bundle is None:
            raise ArtifactError(
                f"{args.artifacts} holds no complete export bundle (manifest.json); train with "
                "PERSIST.EXPORT True, or point --artifacts at an export folder."
            )
        start = time.perf_counter()
        model = load_predictor(bundle, device="cpu").model
        add_onnx(bundle, model)
        path = os.path.join(bundle, ONNX_NAME)
        print(f"{ONNX_NAME}: {os.path.abspath(path)} ({os.path.getsize(path) / 1e6:.1f} MB, "
              f"{time.perf_counter() - start:.1f} s)")

    run()


if __name__ == "__main__":
    main()
