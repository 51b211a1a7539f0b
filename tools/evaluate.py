#!/usr/bin/env python
"""
Score an export bundle (or a run's newest weights) on a COCO-format dataset.

    python tools/evaluate.py --artifacts output/shapes/export --coco-json ann.json \\
        --image-root images/ [--backend onnxruntime] [--json metrics.json]

Prints detectron2's COCO tables (bbox, and segm for a model with masks); --json writes the
metrics in detectron2's results layout ({"bbox": {"AP": ...}, "segm": {...}}). With the
onnxruntime backend it needs numpy, Pillow, pyyaml, onnxruntime and pycocotools only. Categories
are matched by name to the bundle's classes. Exit code 2, with one line on stderr, for bad
input, bad artifacts or a dataset whose category names are not the bundle's.
"""

import argparse

PROG = "evaluate.py"


def get_parser():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--artifacts", required=True,
                        help="an export folder, a training OUTPUT_DIR, or a bundle's URL")
    parser.add_argument("--coco-json", required=True, help="the dataset's COCO annotations")
    parser.add_argument("--image-root", default="",
                        help="the folder the annotations' file_name values are relative to")
    parser.add_argument("--backend", choices=["pytorch", "onnxruntime", "auto"], default="auto",
                        help="as infer_single.py's (default: auto)")
    parser.add_argument("--precision", choices=["float", "int8"], default="float",
                        help="int8: the bundle's INT8 ONNX model (onnxruntime)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="pytorch backend: default cuda if available, else cpu")
    parser.add_argument("--json", help="write the metrics to this JSON file")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    from d2persist.cli import exit_on_known_errors

    @exit_on_known_errors(PROG)
    def run():
        import os
        import sys

        from d2persist.evaluate import evaluate_coco, format_results
        from d2persist.fileio import write_json
        from d2persist.load import load_predictor

        predictor = load_predictor(args.artifacts, device=args.device, backend=args.backend,
                                   precision=args.precision)
        print(f"weights: {predictor.weights}")
        results = evaluate_coco(predictor, args.coco_json, args.image_root,
                                progress=sys.stderr.isatty())
        print(format_results(results, os.path.basename(args.coco_json)))
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            write_json(args.json, {task: {k: None if v != v else v for k, v in m.items()}
                                   for task, m in results.items()})  # NaN as null
            print(f"JSON: {os.path.abspath(args.json)}")

    run()


if __name__ == "__main__":
    main()
