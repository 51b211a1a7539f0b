#!/usr/bin/env python
"""
The INT8 model against the float ONNX model, on the built-in model trained on its default
schedule (or on --run DIR, a finished run of it), each a ratio measured side by side in one run
(sides alternate, medians):

1. per image over the 50 val images: the INT8 ONNX Runtime predictor vs the float one (read,
   resize, run, paste masks, JSON), at 1 thread and at all cores (target <= 0.6x);
2. file size, model.int8.onnx vs model.onnx (target <= 0.35x);
3. box and mask AP on the val split, COCOEvaluator's numbers (the manifest's evaluation entry
   and d2persist.predict.evaluate agree exactly): INT8 minus float (target within 1.0);
4. what was tried: which Conv/Gemm layers stay in float, each variant quantized with the same
   calibration images and measured the same way;
5. what the export's self-evaluation (PERSIST.EXPORT_EVAL) costs after training, per backend,
   next to detectron2's "Total training time" of the same run.
"""

import json
import os
import re
import shutil
import sys
import tempfile

from common import REPO, alternate, machine, median, parse_args, per_image_timer, run, table

#: Name parts of the layers that produce the predictions (RPN objectness and deltas, box
#: classifier and regressor, mask predictor).
PREDICTION = ("objectness_logits", "anchor_deltas", "box_predictor", "mask_head/predictor")
VARIANTS = {
    # name: which Conv/Gemm nodes stay in float (a test on the node name)
    "everything quantized (shipped)": None,
    "prediction layers float": lambda n: any(k in n for k in PREDICTION),
    "stem and prediction layers float": lambda n: "/stem/" in n or any(
        k in n for k in PREDICTION),
    "backbone only quantized": lambda n: "/backbone/" not in n,
    "stem, prediction layers and ROI heads float":
        lambda n: "/stem/" in n or "/roi_heads/" in n or any(k in n for k in PREDICTION),
}


def _profile(path, images, contract):
    """Milliseconds per image of ONNX Runtime's kernels, by operator type (1 thread)."""
    import collections

    import numpy as np
    import onnxruntime as ort

    from d2persist.predict.images import image_input, resize_shortest_edge

    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.enable_profiling = True
    o.profile_file_prefix = os.path.join(tempfile.gettempdir(), "d2persist-bench-ort")
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    for f in images:
        image = resize_shortest_edge(image_input(f, None, contract["format"]),
                                     contract["min_size_test"], contract["max_size_test"])
        s.run(None, {"image": np.ascontiguousarray(image.transpose(2, 0, 1))})
    trace = s.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    os.unlink(trace)
    by = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by[e["args"]["op_name"]] += e["dur"] / 1000 / len(images)
    return by


def _per_image(sessions, images, threads, repeats):
    import onnxruntime as ort

    from d2persist.artifacts.manifest import metadata_from_json
    from d2persist.predict.onnx_predictor import OnnxPredictor

    def predictor(path, manifest):
        o = ort.SessionOptions()
        o.intra_op_num_threads = threads
        s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
        return OnnxPredictor(s, manifest["input"], metadata_from_json(manifest["metadata"]))

    def timed(p):
        go = per_image_timer(p, images)
        go()  # warm-up
        return go

    sides = {name: timed(predictor(path, man)) for name, (path, man) in sessions.items()}
    return {k: median(v) for k, v in alternate(sides, repeats).items()}


def main():
    args = parse_args(__doc__, repeats=5, run=True)
    print(f"machine: {machine()}")
    work = tempfile.mkdtemp(prefix="d2persist-bench-int8-")
    try:
        out = args.run or os.path.join(work, "run")
        if not args.run:
            run([sys.executable, os.path.join(REPO, "tools", "train_net.py"), "OUTPUT_DIR", out,
                 "PERSIST.EXPORT_FORMATS", "['safetensors', 'onnx', 'onnx-int8']"], cwd=REPO)
        report(out, work, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(out, work, repeats):
    import onnx
    from detectron2.data import DatasetCatalog
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from d2persist.data.shapes import register_shapes
    from d2persist.export.bundle import quantize as Q
    from d2persist.files.atomic import sha256_file
    from d2persist.predict.evaluate import evaluate_coco
    from d2persist.predict.onnx_predictor import load_onnx_predictor

    bundle = os.path.join(out, "export")
    with open(os.path.join(bundle, "manifest.json")) as f:
        manifest = json.load(f)
    float_path, int8_path = (os.path.join(bundle, n) for n in ("model.onnx", "model.int8.onnx"))
    train, val = register_shapes()
    images = [d["file_name"] for d in DatasetCatalog.get(val)]
    coco = os.path.join(out, "inference", f"{val}_coco_format.json")
    cores = os.cpu_count()
    rows = []
    for threads in (1, cores):
        t = _per_image({"int8": (int8_path, manifest), "float": (float_path, manifest)},
                       images, threads, repeats)
        rows.append((f"{threads} thread(s): INT8 / float", f"{t['int8'] * 1e3:.1f} / "
                     f"{t['float'] * 1e3:.1f} ms", f"{t['int8'] / t['float']:.3f}x"))
    table(f"Per image over {len(images)} val images, ONNX Runtime (medians of {repeats})", rows,
          ("measure", "value", "ratio (target <= 0.6)"))
    sizes = [os.path.getsize(p) for p in (int8_path, float_path)]
    table("File size", [("model.int8.onnx / model.onnx", f"{sizes[0] / 2**20:.1f} / "
                         f"{sizes[1] / 2**20:.1f} MiB", f"{sizes[0] / sizes[1]:.3f}x")],
          ("measure", "value", "ratio (target <= 0.35)"))
    ev = manifest["evaluation"]
    ref, fl, q = (ev["reference"], ev["backends"]["onnxruntime"],
                  ev["backends"]["onnxruntime-int8"])
    table(f"AP on {ev['dataset']} ({ev['images']} images), the manifest's evaluation entry", [
        (k, f"{ref[k]:.2f}", f"{fl[k]:.2f}", f"{q[k]:.2f}", f"{q[k] - fl[k]:+.2f}")
        for k in ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50")],
        ("metric", "training", "ONNX float", "INT8", "INT8 - float (target within 1.0)"))

    log = open(os.path.join(out, "log.txt")).read() if os.path.isfile(
        os.path.join(out, "log.txt")) else ""
    trained = re.findall(r"Total training time: (\d+):(\d+):(\d+)", log)
    train_s = sum(int(x) * m for x, m in zip(trained[-1], (3600, 60, 1))) if trained else None
    secs = ev.get("seconds", {})
    table("The export's self-evaluation after training (the manifest's seconds)", [
        (b, f"{secs[b]:.1f} s", f"{secs[b] / train_s:.3f}x" if train_s else "?")
        for b in secs] + [("all backends", f"{sum(secs.values()):.1f} s",
                           f"{sum(secs.values()) / train_s:.3f}x" if train_s else "?")],
        ("backend", "seconds", f"/ training time ({train_s} s)"))

    pre = os.path.join(work, "pre.onnx")
    quant_pre_process(float_path, pre, skip_symbolic_shape=True)
    nodes = [n.name for n in onnx.load(pre).graph.node if n.op_type in Q.QUANTIZED_OPS]
    cal = Q.calibration_subset([d["file_name"] for d in DatasetCatalog.get(train)],
                               manifest["onnx_int8"]["calibration_images"])
    float_ap = evaluate_coco(load_onnx_predictor(bundle, cache=False), coco)
    sessions, aps = {"float": (float_path, manifest)}, {}
    for name, keep in VARIANTS.items():
        path = os.path.join(work, f"v{len(sessions)}.onnx")
        if keep is None:
            shutil.copy(int8_path, path)
        else:
            quantize_static(pre, path, Q._Reader(cal, manifest["input"]),
                            quant_format=QuantFormat.QDQ, op_types_to_quantize=list(
                                Q.QUANTIZED_OPS),
                            nodes_to_exclude=[n for n in nodes if keep(n)],
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
        sessions[name] = (path, manifest)
        variant = os.path.join(work, f"b{len(sessions)}")
        shutil.copytree(bundle, variant)
        shutil.copy(path, os.path.join(variant, "model.int8.onnx"))
        files = dict(manifest["files"], **{"model.int8.onnx": {
            "sha256": sha256_file(path), "size": os.path.getsize(path)}})
        with open(os.path.join(variant, "manifest.json"), "w") as f:
            json.dump(dict(manifest, files=files), f)
        aps[name] = evaluate_coco(load_onnx_predictor(variant, precision="int8", cache=False),
                                  coco)
    times = _per_image(sessions, images, cores, repeats)
    table(f"What was tried: Conv/Gemm layers kept in float ({cores} threads, medians)", [
        (name, f"{times[name] / times['float']:.3f}x",
         f"{os.path.getsize(sessions[name][0]) / sizes[1]:.3f}x",
         f"{aps[name]['bbox']['AP'] - float_ap['bbox']['AP']:+.2f}",
         f"{aps[name]['segm']['AP'] - float_ap['segm']['AP']:+.2f}") for name in VARIANTS],
        ("variant", "time / float", "size / float", "box AP - float", "mask AP - float"))
    ops = _profile(float_path, images, manifest["input"])
    total = sum(ops.values())
    convs = sum(v for k, v in ops.items() if k in ("Conv", "FusedConv", "Gemm", "FusedGemm"))
    table("Where the float model's time goes (ONNX Runtime kernels, 1 thread, per image)", [
        ("Conv and Gemm (what INT8 speeds up)", f"{convs:.2f} ms", f"{convs / total:.0%}"),
        ("RoiAlign, NMS and the rest", f"{total - convs:.2f} ms", f"{1 - convs / total:.0%}"),
    ] + [(f"  of which {k}", f"{v:.2f} ms", f"{v / total:.0%}") for k, v in ops.most_common(8)
         if k not in ("Conv", "FusedConv", "Gemm", "FusedGemm")][:5],
        ("kernels", "time", "share"))


if __name__ == "__main__":
    main()
