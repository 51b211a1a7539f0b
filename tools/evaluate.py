#!/usr/bin/env python
"""
Score an export bundle (or a run's newest weights) with its model family's metric.

    python tools/evaluate.py --artifacts output/shapes/export --coco-json ann.json \\
        --image-root images/ [--backend onnxruntime] [--json metrics.json]
    python tools/evaluate.py --artifacts A --sem-seg-dir labels/ --image-root images/
    python tools/evaluate.py --artifacts A --panoptic-json pan.json --panoptic-root pan/ \\
        --image-root images/

Prints detectron2's tables: COCO bbox, segm (masks) and keypoints AP (with the config's
TEST.KEYPOINT_OKS_SIGMAS) for a COCO instances json; mIoU, fwIoU, mACC, pACC for a folder of
semantic label PNGs (class ids in the bundle's stuff_classes order, named as their images); PQ,
SQ, RQ for a COCO panoptic json and its PNG folder. --json writes the metrics in detectron2's
results layout ({"bbox": {"AP": ...}, "sem_seg": {"mIoU": ...}, ...}). With the onnxruntime
backend it needs numpy, Pillow, pyyaml, onnxruntime and pycocotools (panoptic: panopticapi)
only. Categories are matched by name to the bundle's classes. Exit code 2, with one line on
stderr, for bad input, bad artifacts or a dataset whose category names are not the bundle's.
"""

import argparse

from d2persist.cli import add_predictor_arguments

PROG = "evaluate.py"


def get_parser():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--artifacts", required=True,
                        help="an export folder, a training OUTPUT_DIR, or a bundle's URL")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--coco-json", help="the dataset's COCO annotations (boxes, masks, "
                                          "keypoints)")
    data.add_argument("--sem-seg-dir", help="a folder of semantic label PNGs, one per image")
    data.add_argument("--panoptic-json", help="the dataset's COCO panoptic annotations")
    parser.add_argument("--panoptic-root", help="the folder of --panoptic-json's PNGs")
    parser.add_argument("--image-root", default="",
                        help="the folder the images (file_name values) are in")
    parser.add_argument("--ignore-label", type=int, default=None,
                        help="--sem-seg-dir: the label value not scored (default: the bundle's "
                             "metadata ignore_label, else 255)")
    parser.add_argument("--keypoint-oks-sigmas", type=float, nargs="+",
                        help="OKS sigma of each keypoint (default: the config's "
                             "TEST.KEYPOINT_OKS_SIGMAS)")
    add_predictor_arguments(parser)
    parser.add_argument("--json", help="write the metrics to this JSON file")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    from d2persist.cli import exit_on_known_errors

    @exit_on_known_errors(PROG)
    def run():
        import os
        import sys

        from d2persist.artifacts.manifest import local_bundle
        from d2persist.errors import D2PersistError
        from d2persist.files.atomic import check_output_file, write_json
        from d2persist.predict import evaluate as ev
        from d2persist.predict.load import load_predictor

        if args.panoptic_json and not args.panoptic_root:
            raise D2PersistError("--panoptic-json needs --panoptic-root, the folder of its PNGs.")
        if args.json:
            check_output_file(args.json)  # before the evaluation, not after it
        dataset = None
        if args.coco_json:  # the dataset too, before the model loads
            dataset = ev.check_coco_dataset(args.coco_json, args.image_root)
        artifacts = local_bundle(args.artifacts)  # a URL: downloaded and verified once
        predictor = load_predictor(artifacts, device=args.device, backend=args.backend,
                                   precision=args.precision)
        print(f"weights: {predictor.weights}")
        progress = sys.stderr.isatty()
        if args.sem_seg_dir:
            results = ev.evaluate_sem_seg(predictor, args.sem_seg_dir, args.image_root,
                                          args.ignore_label, progress=progress)
        elif args.panoptic_json:
            results = ev.evaluate_panoptic(predictor, args.panoptic_json, args.panoptic_root,
                                           args.image_root, progress=progress)
        else:
            sigmas = args.keypoint_oks_sigmas or ev.config_keypoint_sigmas(artifacts)
            results = ev.evaluate_coco(predictor, args.coco_json, args.image_root,
                                       progress=progress, kpt_oks_sigmas=sigmas,
                                       dataset=dataset)
        source = args.coco_json or args.sem_seg_dir or args.panoptic_json
        print(ev.format_results(results, os.path.basename(os.path.normpath(source))))
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            write_json(args.json, {task: {k: None if v != v else v for k, v in m.items()}
                                   for task, m in results.items()})  # NaN as null
            print(f"JSON: {os.path.abspath(args.json)}")

    run()


if __name__ == "__main__":
    main()
