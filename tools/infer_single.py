#!/usr/bin/env python
"""
Predict with a d2persist export, or with a training run's newest checkpoint.

    python tools/infer_single.py --image img.jpg --artifacts output/shapes
    python tools/infer_single.py --image folder/ --artifacts output/shapes/export \\
        --output vis/ --json preds/

Prediction reads and resizes each image exactly as training-time evaluation does. Exit code 2,
with one line on stderr, for bad input or bad artifacts.
"""

import argparse
import os

from d2persist.cli import add_predictor_arguments, add_threshold_argument

PROG = "infer_single.py"


def get_parser():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--image", nargs="+", action="extend", required=True,
                        help="image file(s) or folder(s) of images")
    parser.add_argument("--artifacts", required=True,
                        help="an export folder, or a training OUTPUT_DIR")
    parser.add_argument("--output", help="visualization file (a folder for several images); "
                        "with neither --output nor --json, both go to predictions/ "
                        "(predictions/<image>.png and .json); with one, only that is written")
    parser.add_argument("--json", help="JSON file (a folder for several images)")
    add_threshold_argument(parser)
    add_predictor_arguments(parser)
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs (PyTorch only: an ONNX "
                        "graph is fixed when exported)")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    from d2persist.cli import exit_on_known_errors

    @exit_on_known_errors(PROG)
    def run():
        from d2persist.predict.infer import check_outputs, collect_images, predict_files
        from d2persist.predict.load import load_predictor

        images, many = collect_images(args.image)
        output, json_out = args.output, args.json
        if output is None and json_out is None:
            default = "predictions"
            output = default if many else os.path.join(default, _stem(images[0]) + ".png")
            json_out = default if many else os.path.join(default, _stem(images[0]) + ".json")
        check_outputs(images, output, json_out, many)  # before the model loads
        predictor = load_predictor(args.artifacts, device=args.device, opts=args.opts,
                                   backend=args.backend, precision=args.precision)
        print(f"weights: {predictor.weights}")
        predict_files(predictor, images, output, json_out, args.confidence_threshold, many)
        for what, path in (("visualization", output), ("JSON", json_out)):
            if path:
                print(f"{what}: {os.path.abspath(path)}")

    run()


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


if __name__ == "__main__":
    main()
