#!/usr/bin/env python
"""
Add a portable model to the export bundle of an existing run (detectron2's tool name), then
evaluate the bundle as training's export does.

    python tools/export_model.py --artifacts output/shapes --format onnx
    python tools/export_model.py --artifacts output/shapes --format onnx-int8

--artifacts is a run folder (its export is used) or an export bundle. onnx writes model.onnx;
onnx-int8 writes model.int8.onnx (model.onnx quantized by ONNX Runtime, calibrated on training
images; model.onnx is exported first if missing). Each file is written atomically and the
manifest is updated once it is complete. Then, unless --no-eval, every backend of the bundle is
evaluated on the config's first test dataset with the family's evaluator (COCOEvaluator, the
semantic or panoptic one) and the manifest's evaluation entry is replaced. Exit code 2, with one
line on stderr, for bad input, bad artifacts or a model the exporter cannot handle. The bundle
of a run folder (also given as the bundle, however deep its PERSIST.EXPORT_DIR) is not touched
while a training run writes that folder (it holds the run lock: one process writes a run
folder).
"""

import argparse

from d2persist.cli import non_negative_number, positive_int
from d2persist.layout import ONNX, ONNX_INT8

PROG = "export_model.py"


def get_parser():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--artifacts", required=True, help="a training OUTPUT_DIR or its export")
    parser.add_argument("--format", choices=[ONNX.format, ONNX_INT8.format], default=ONNX.format,
                        help="(default: onnx)")
    parser.add_argument("--calibration-images", type=positive_int, default=None,
                        help="onnx-int8: how many training images calibrate it (default: the "
                        "run's PERSIST.CALIBRATION_IMAGES)")
    parser.add_argument("--calibration-dir",
                        help="onnx-int8: calibrate on the images of this folder instead of the "
                        "config's training dataset")
    parser.add_argument("--int8-budget", type=non_negative_number, default=None,
                        help="onnx-int8: how far INT8 may score from training on the headline "
                        "metric; outside it, its most sensitive layers stay float (default: "
                        "the run's PERSIST.INT8_BUDGET, else 1.0)")
    parser.add_argument("--no-eval", action="store_true",
                        help="do not evaluate the bundle afterwards")
    return parser


def _dataset(config, kind, split):
    """The config's first ``split`` ("train"/"test") dataset name, or None."""
    if kind == "lazy":
        names = (((config.get("dataloader") or {}).get(split) or {}).get("dataset") or {}).get(
            "names")
    else:
        names = (config.get("DATASETS") or {}).get(split.upper())
    names = [names] if isinstance(names, str) else list(names or [])
    return names[0] if names else None


def _run_of(artifacts, bundle):
    """
    The run folder whose export ``bundle`` is: ``artifacts`` given as a run folder, else the
    nearest folder above the bundle that is a run exporting there (its ``PERSIST.EXPORT_DIR``
    may be nested, ``a/b``); None for a bundle of its own.
    """
    import os

    from d2persist.artifacts.bundle import persist_options_of_run
    from d2persist.layout import DEFAULT_EXPORT_DIR, LAST_CHECKPOINT, LOCK_NAME, PERSIST_FILE

    bundle = os.path.abspath(bundle)
    if bundle != os.path.abspath(artifacts):
        return artifacts
    folder = os.path.dirname(bundle)
    while True:
        if any(os.path.isfile(os.path.join(folder, n))
               for n in (LOCK_NAME, LAST_CHECKPOINT, PERSIST_FILE)):
            # where it exports, whether or not its manifest is there now (a resumed run
            # exporting again removes it first)
            name = persist_options_of_run(folder).get("EXPORT_DIR", DEFAULT_EXPORT_DIR)
            return folder if os.path.abspath(os.path.join(folder, name)) == bundle else None
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def _lock_run_of(run, bundle):
    """
    Take the run lock of the run folder ``run`` holding ``bundle`` (none: a bundle of its own),
    refusing in one sentence while a training run writes it (a resumed run would export into
    the bundle too).
    """
    from d2persist.errors import RunFolderBusyError
    from d2persist.files.lock import lock_run_folder, read_lock_holder

    if run is None:
        return
    try:
        lock_run_folder(run)
    except RunFolderBusyError:
        holder = read_lock_holder(run) or {}
        raise RunFolderBusyError(
            f"{run} is being written by a training run (host {holder.get('host', '?')}, pid "
            f"{holder.get('pid', '?')}, since {holder.get('since', '?')}), which exports into "
            f"{bundle} too: run {PROG} once it has ended.") from None


def main(argv=None):
    args = get_parser().parse_args(argv)
    from d2persist.cli import exit_on_known_errors

    @exit_on_known_errors(PROG)
    def run():
        import os
        import tempfile
        import time

        from detectron2.data import DatasetCatalog

        from d2persist.artifacts.bundle import find_bundle, persist_options_of_run, read_manifest
        from d2persist.artifacts.resolve import resolve_artifacts
        from d2persist.data.shapes import register_shapes
        from d2persist.errors import ArtifactError, ConfigError
        from d2persist.export.bundle import add_int8, add_onnx
        from d2persist.export.quantize import calibration_subset
        from d2persist.layout import ONNX_INT8_NAME, ONNX_NAME
        from d2persist.predict.infer import collect_images
        from d2persist.predict.predictor import load_torch_predictor

        if not os.path.exists(args.artifacts):
            raise ArtifactError(f"{args.artifacts} does not exist.")
        bundle = find_bundle(args.artifacts) if os.path.isdir(args.artifacts) else None
        if bundle is None:
            raise ArtifactError(
                f"{args.artifacts} holds no complete export bundle (manifest.json); export a "
                "finished run by running its training command again with --resume and "
                "PERSIST.EXPORT True (it trains no further), or point --artifacts at an export "
                "folder."
            )
        if args.no_eval and args.int8_budget is not None:
            raise ConfigError("--int8-budget is how the evaluation judges INT8: without it "
                              "(--no-eval) it would do nothing; drop one of them.")
        run_dir = _run_of(args.artifacts, bundle)
        options = persist_options_of_run(run_dir) if run_dir else {}
        _lock_run_of(run_dir, bundle)
        register_shapes()  # the built-in datasets, as tools/train_net.py registers them
        art = resolve_artifacts(bundle)
        start = time.perf_counter()
        written, calibration = [], []
        if args.format == ONNX.format or ONNX_NAME not in read_manifest(bundle, False)["files"]:
            add_onnx(bundle, load_torch_predictor(bundle, device="cpu").model)
            written.append(ONNX_NAME)
        if args.format == ONNX_INT8.format:
            if args.calibration_dir:
                images, _ = collect_images([args.calibration_dir])
            else:
                name = _dataset(art.config, art.config_kind, "train")
                if name not in DatasetCatalog.list():
                    raise ConfigError(
                        f"The training dataset {name!r} of {bundle} is not registered in this "
                        "process; pass --calibration-dir with a folder of training images.")
                images = [d["file_name"] for d in DatasetCatalog.get(name)]
            count = args.calibration_images or int(options.get("CALIBRATION_IMAGES", 64))
            calibration = calibration_subset(images, count)
            if not calibration:  # before the bundle is touched: its INT8 model stays
                raise ConfigError(f"{args.calibration_dir or repr(name)} holds no image to "
                                  "calibrate INT8 on; pass --calibration-dir with a folder of "
                                  "training images.")
            add_int8(bundle, calibration)
            written.append(ONNX_INT8_NAME)
        for name in written:
            path = os.path.join(bundle, name)
            print(f"{name}: {os.path.abspath(path)} ({os.path.getsize(path) / 1e6:.1f} MB)")
        print(f"export: {time.perf_counter() - start:.1f} s")
        if args.no_eval:
            return
        test = _dataset(art.config, art.config_kind, "test")
        if test is None:
            print("not evaluated: the config names no test dataset")
            return
        if test not in DatasetCatalog.list():
            print(f"not evaluated: the config's test dataset {test!r} is not registered here")
            return
        from d2persist.export.self_eval import evaluate_saved_bundle, family_evaluator
        from d2persist.predict.evaluate import keypoint_sigmas

        sigmas = keypoint_sigmas(art.config)
        with tempfile.TemporaryDirectory(prefix="d2persist-eval-") as tmp:
            budget = args.int8_budget
            if budget is None:
                budget = float(options.get("INT8_BUDGET", 1.0))
            entry = evaluate_saved_bundle(
                bundle, test, family_evaluator(test, tmp, sigmas), device="cpu",
                run_dir=run_dir, calibration_images=calibration,
                int8_budget=budget)["evaluation"]
        for backend, metrics in entry["backends"].items():
            shown = ", ".join(f"{k} {metrics[k]:.2f}" for k in (
                "bbox/AP", "segm/AP", "keypoints/AP", "sem_seg/mIoU", "panoptic_seg/PQ")
                if metrics.get(k) is not None)
            print(f"{backend}: {shown} (max difference to training "
                  f"{entry['max_difference'].get(backend):.3f})")
        for backend in entry["failed"]:
            print(f"{backend}: FAILED: {entry['errors'][backend]}")

    run()


if __name__ == "__main__":
    main()
