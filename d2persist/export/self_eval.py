"""
The export measures itself: the bundle, loaded from its folder, evaluated through every backend
it holds with the run's own evaluator on the run's test set, and compared with the final
in-training evaluation (see :func:`evaluate_bundle`).
"""

import contextlib
import io
import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from detectron2.evaluation import DatasetEvaluator
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils import comm

from ..artifacts.bundle import read_manifest
from ..artifacts.manifest import EVAL_CHECKED, EVAL_TOLERANCE, export_backends
from ..artifacts.view import metrics_json_history
from ..collective import main_says
from ..errors import ConfigError
from ..layout import METRICS_NAME, MODEL_FILES, ONNX, ONNX_INT8, PYTORCH
from .bundle import add_int8, write_manifest
from .quantize import sensitivity_ranking

__all__ = ["evaluate_bundle", "evaluate_saved_bundle", "compare_metrics", "metrics_at",
           "evaluator_name", "family_evaluator", "HEADLINE_METRICS"]

logger = logging.getLogger(__name__)

#: The metrics a log line shows, by the end of their name: COCO AP (boxes, masks, keypoints),
#: mIoU (semantic), PQ (panoptic).
HEADLINE_METRICS = ("/AP", "/AP50", "/mIoU", "/PQ")


def evaluator_name(evaluator: DatasetEvaluator) -> str:
    """``COCOEvaluator``, or ``DatasetEvaluators(COCOEvaluator, ...)``."""
    inner = getattr(evaluator, "_evaluators", None)
    name = type(evaluator).__name__
    return f"{name}({', '.join(evaluator_name(e) for e in inner)})" if inner else name


def family_evaluator(dataset_name: str, output_dir: Optional[str] = None,
                     kpt_oks_sigmas: Sequence[float] = ()) -> DatasetEvaluator:
    """
    detectron2's evaluator for a dataset's task, chosen by its metadata's ``evaluator_type`` as
    detectron2's ``tools/train_net.py`` chooses: ``coco`` COCOEvaluator (boxes, masks,
    keypoints with ``kpt_oks_sigmas``, i.e. ``TEST.KEYPOINT_OKS_SIGMAS``), ``sem_seg``
    SemSegEvaluator, ``coco_panoptic_seg`` all three with COCOPanopticEvaluator, and LVIS,
    Pascal VOC and Cityscapes' own; COCOEvaluator for a dataset that names none.

    Args:
        output_dir (str): where the evaluators may write; COCOEvaluator needs one for a dataset
            that is not a COCO json (it writes the converted json there).

    Raises:
        ConfigError: an ``evaluator_type`` that detectron2 has no evaluator for.
    """
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import (
        COCOEvaluator,
        COCOPanopticEvaluator,
        DatasetEvaluators,
        SemSegEvaluator,
    )

    kind = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
    others = {"lvis": "LVISEvaluator", "pascal_voc": "PascalVOCDetectionEvaluator",
              "cityscapes_instance": "CityscapesInstanceEvaluator",
              "cityscapes_sem_seg": "CityscapesSemSegEvaluator"}
    if kind in others:
        import detectron2.evaluation as evaluation

        cls = getattr(evaluation, others[kind])
        return cls(dataset_name, output_dir=output_dir) if kind == "lvis" else cls(dataset_name)
    if kind not in ("coco", "sem_seg", "coco_panoptic_seg"):
        raise ConfigError(f"No evaluator for dataset {dataset_name}'s evaluator_type {kind!r}: "
                          "define the trainer's build_evaluator.")
    evaluators = []
    if kind in ("sem_seg", "coco_panoptic_seg"):
        evaluators.append(SemSegEvaluator(dataset_name, output_dir=output_dir))
    if kind in ("coco", "coco_panoptic_seg"):
        evaluators.append(COCOEvaluator(dataset_name, output_dir=output_dir,
                                        kpt_oks_sigmas=tuple(kpt_oks_sigmas)))
    if kind == "coco_panoptic_seg":
        evaluators.append(COCOPanopticEvaluator(dataset_name, output_dir))
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)


def _silence_output_files(evaluator):
    """
    Keep the evaluator from writing its prediction files (``coco_instances_results.json``,
    ...) over the ones of the in-training evaluation: detectron2's evaluators write them when
    their ``_output_dir`` is set.
    """
    for e in getattr(evaluator, "_evaluators", None) or [evaluator]:
        if getattr(e, "_output_dir", None):
            e._output_dir = None


def _json_number(v):
    v = float(v)
    return None if math.isnan(v) else v


def _fmt(v):
    return "NaN" if v is None else f"{v:.3f}"


def metrics_at(history: Callable[[str], Optional[list]], keys: Sequence[str],
               iteration: int) -> Dict[str, Optional[float]]:
    """
    The metrics an evaluation stored under ``iteration``.

    Args:
        history: metric name -> its ``[(value, iteration), ...]``, or None if never stored
            (e.g. from ``EventStorage.histories()`` or from ``metrics.json``).
        keys: the metric names wanted.

    Returns:
        dict: name -> value (None for NaN) of those stored under ``iteration``.
    """
    out = {}
    for key in keys:
        for value, it in reversed(history(key) or []):
            if int(it) == int(iteration):
                out[key] = _json_number(value)
                break
    return out


def compare_metrics(reference: dict, results: dict, tolerance: float,
                    checked: Optional[Sequence[str]] = None) -> Tuple[float, List[str]]:
    """
    ``(max_difference, outside)``: the largest absolute difference over the metrics both hold,
    and the names of those differing by more than ``tolerance`` (a value against NaN, or a
    reference metric the results lack, is outside).

    Args:
        checked (tuple[str]): compare only the metrics whose names end so (None: all).
    """
    worst = 0.0
    outside: List[str] = []
    for key, ref in sorted(reference.items()):
        if checked and not key.endswith(tuple(checked)):
            continue
        got = results.get(key, "missing")
        if ref is None and got is None:
            continue
        if ref is None or got is None or got == "missing":
            outside.append(key)
            continue
        diff = abs(float(got) - float(ref))
        worst = max(worst, diff)
        if diff > tolerance:
            outside.append(key)
    return worst, outside


def _outputs(pred):
    """
    The detectron2 output dict of a prediction of either backend, for the run's evaluator, made
    from its arrays (so that both backends reach the evaluator alike, and no inference-mode
    tensor does: COCOEvaluator shifts keypoints in place):
    ``instances`` (with masks and keypoints), ``sem_seg`` (the arg-maxed map as one-hot scores:
    its arg-max, all SemSegEvaluator reads, is the map), ``panoptic_seg`` and ``proposals``.
    """
    import torch
    from detectron2.structures import Boxes, Instances

    a = pred.arrays
    out = {}
    if a.boxes is not None:
        inst = Instances((a.height, a.width))
        inst.pred_boxes = Boxes(torch.as_tensor(a.boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.as_tensor(a.scores, dtype=torch.float32)
        inst.pred_classes = torch.as_tensor(a.classes, dtype=torch.int64)
        if a.masks is not None:
            inst.pred_masks = torch.as_tensor(a.masks)
        if a.keypoints is not None:
            inst.pred_keypoints = torch.as_tensor(a.keypoints, dtype=torch.float32)
        out["instances"] = inst
    if a.sem_seg is not None:
        classes = max(len(pred.metadata.get("stuff_classes") or []), int(a.sem_seg.max()) + 1)
        labels = torch.as_tensor(a.sem_seg, dtype=torch.int64)[None]
        out["sem_seg"] = torch.zeros((classes, a.height, a.width), dtype=torch.uint8).scatter_(
            0, labels, 1)  # a byte a pixel and class: a float one-hot of COCO-stuff is ~1.5 GB
    if a.panoptic is not None:
        out["panoptic_seg"] = (torch.as_tensor(a.panoptic, dtype=torch.int32),
                               [dict(s) for s in a.segments_info])
    if a.proposals is not None:
        props = Instances((a.height, a.width))
        props.proposal_boxes = Boxes(torch.as_tensor(a.proposals, dtype=torch.float32))
        props.objectness_logits = torch.as_tensor(a.objectness, dtype=torch.float32)
        out["proposals"] = props
    return out


def _load(export_dir, backend, device, cache=True):
    if backend == PYTORCH.backend:
        from ..predict.predictor import load_torch_predictor

        return load_torch_predictor(export_dir, device=device)
    from ..predict.onnx_predictor import load_onnx_predictor

    model = next(m for m in MODEL_FILES if m.backend == backend)
    return load_onnx_predictor(export_dir, precision=model.precision, cache=cache)


@contextlib.contextmanager
def _quiet():
    """
    detectron2's evaluation tables and pycocotools' printout stay out of the log: the bundle's
    evaluation logs one line per backend (and the manifest holds every number).
    """
    log = logging.getLogger("detectron2.evaluation")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        log.setLevel(level)


def _run(predictor: Any, dataset: List[dict], evaluator: DatasetEvaluator
         ) -> Tuple[Optional[dict], Optional[str]]:
    """Evaluate ``predictor`` on ``dataset`` (this process's part); collective."""
    evaluator.reset()
    error = None
    for d in dataset:
        if error is not None:
            break
        try:
            evaluator.process([d], [_outputs(predictor(d["file_name"]))])
        except Exception as e:  # the others still wait in evaluate(): no early return
            error = f"{type(e).__name__}: {e}"
    with _quiet():
        try:
            results = evaluator.evaluate()  # gathers to the main process when distributed
        except Exception as e:  # after the gathering: the evaluator's own computation failed
            results, error = None, error or f"{type(e).__name__}: {e}"
    return results, error


def _flat(results):
    return {k: _json_number(v) for k, v in flatten_results_dict(results or {}).items()}


def _int8_tolerance(budget):
    return EVAL_TOLERANCE[ONNX_INT8.backend] if budget is None else float(budget)


def _adapt_int8(export_dir, dataset, evaluator, reference, images, tolerance, device, first):
    """
    Make the bundle's INT8 model again with its 1, 2, 4, ... most sensitive Conv/Gemm nodes in
    float (fewer than all: one in float for every layer is no INT8 model) until it scores within
    ``tolerance`` of ``reference``; if none does, the all-layers model is restored. The
    manifest's ``onnx_int8`` entry records the measured ranking, every try and what the kept
    layers cost (evaluation seconds per image, beside the all-layers model's), given ``first``:
    (metrics, evaluation seconds per image) of the all-layers model. Collective: every process
    evaluates each try. A model with one ranked layer or none has no try to make.

    Returns:
        tuple: on the main process, (metrics, max difference, metrics outside, error sentence
        or None) of the model left in the bundle; None on the others.
    """
    main = comm.is_main_process()
    checked = EVAL_CHECKED.get(ONNX_INT8.backend)
    ranking = []
    if main:
        ranking = sensitivity_ranking(os.path.join(export_dir, ONNX.file),
                                      os.path.join(export_dir, ONNX_INT8.file), images[:8],
                                      read_manifest(export_dir, False)["input"])
        logger.info("INT8 is outside its budget of %s: keeping its most sensitive layers in "
                    "float (of %d ranked).", tolerance, len(ranking))
    count = main_says(len(ranking))
    # 1, 2, 4, ... layers in float, at least one left quantized (with none, it is no INT8 model)
    steps = [2 ** i for i in range(count.bit_length()) if 2 ** i < count]
    first, first_seconds = first
    all_worst, all_outside = compare_metrics(reference, first, tolerance, checked) if main \
        else (None, None)
    tries, best = [], None
    for k in steps:
        start = time.perf_counter()
        predictor = None
        if main:
            add_int8(export_dir, images, [name for name, _ in ranking[:k]])
            # (a model tried once: its optimized graph would stay in the cache for a week)
            predictor = _load(export_dir, ONNX_INT8.backend, device, cache=False)
        results, error = _run(predictor, dataset if main else [], evaluator)
        if main:
            metrics = _flat(results)
            worst, outside = compare_metrics(reference, metrics, tolerance, checked)
            tries.append({"float_layers": k, "max_difference": worst,
                          "seconds_per_image": round((time.perf_counter() - start)
                                                     / max(1, len(dataset)), 4)})
            if not outside and error is None:
                best = (metrics, worst, outside, None)
        if main_says(best is not None):
            break
    if not main:
        return None
    record = {"budget": tolerance, "all_layers_max_difference": all_worst,
              "all_layers_seconds_per_image": round(first_seconds, 4),
              "ranking": [{"node": n, "sqnr_db": round(v, 2)}
                          for n, v in ranking[:max(steps[-1:] + [1])]], "tries": tries}
    if best is None:
        if tries:  # the all-layers model, as before
            add_int8(export_dir, images)
            error = (f"no INT8 model within the budget of {tolerance} exists for this model: "
                     f"with up to {steps[-1]} of its {count} layers in float (the most "
                     f"sensitive first) the closest was "
                     f"{min(t['max_difference'] for t in tries):.3f} away")
        else:
            error = (f"no INT8 model within the budget of {tolerance} exists for this model: "
                     f"it has {count} quantized layer(s), none of which can stay in float")
        best = (first, all_worst, all_outside, error)
        logger.error("INT8: %s.", error)
    else:
        logger.info("INT8 within its budget with its %d most sensitive layers in float (max "
                    "difference %.3f).", tries[-1]["float_layers"], best[1])
    manifest = read_manifest(export_dir, False)
    manifest[ONNX_INT8.entry] = dict(manifest.get(ONNX_INT8.entry) or {}, adapted=record)
    write_manifest(export_dir, manifest)
    return best


def evaluate_bundle(
    export_dir: str,
    backends: Sequence[str],
    dataset_name: str,
    evaluator: DatasetEvaluator,
    reference: Callable[[Sequence[str]], Dict[str, Optional[float]]],
    device: str = "cpu",
    training_is_reference: bool = True,
    calibration_images: Sequence[str] = (),
    int8_budget: Optional[float] = None,
) -> Optional[dict]:
    """
    Evaluate the bundle in ``export_dir`` through each of ``backends``, on every image of
    ``dataset_name``, with ``evaluator``; compare with ``reference``.

    Collective: every process calls it with the same ``backends``; the main process predicts
    every image (the bundle is on its disk), the others take part in the evaluator's gathering.
    Each image is read from its file by the bundle's own predictor (reading, resizing and
    post-processing included), as a deployed bundle would see it.

    Args:
        backends: names of :data:`d2persist.layout.EVAL_BACKENDS`.
        evaluator (DatasetEvaluator): built for ``dataset_name``; it writes no files here.
        reference: metric names -> the in-training evaluation of these weights, flattened as
            EvalHook stores it (``"bbox/AP"``); called on the main process with the names the
            first backend evaluated produced; {} if there was no such evaluation.
        device (str): where the PyTorch backend runs.
        training_is_reference (bool): False when the in-training evaluation did not evaluate
            these weights alone (processes whose BatchNorm statistics differ each evaluated
            their share of the images with their own): the backends are then compared with the
            first one (the PyTorch bundle), and the training numbers are recorded beside.
        calibration_images: the INT8 model's calibration images (main process). With them, an
            INT8 model outside its budget is made again with its most sensitive layers in float
            (:func:`d2persist.export.quantize.sensitivity_ranking`; 1, 2, 4, ... of them) until one
            is within, or none is; the manifest's ``onnx_int8`` and ``files`` are replaced then.
        int8_budget (float): INT8's tolerance (``PERSIST.INT8_BUDGET``; default
            :data:`~d2persist.artifacts.manifest.EVAL_TOLERANCE`'s).

    Returns:
        dict or None: on the main process, the manifest's ``evaluation`` entry
        (``dataset``, ``evaluator``, ``images``, ``reference``, ``backends``, ``tolerance``,
        ``max_difference``, ``seconds``, ``failed``, ``errors``); None on the others.
    """
    from detectron2.data import DatasetCatalog

    main = comm.is_main_process()
    dataset = DatasetCatalog.get(dataset_name) if main else []
    _silence_output_files(evaluator)
    entry: Dict[str, Any] = {
        "dataset": dataset_name, "evaluator": evaluator_name(evaluator),
        "images": len(dataset), "reference": None, "reference_from": "training",
        "training": None, "backends": {},
        "tolerance": {}, "max_difference": {}, "seconds": {}, "failed": [], "errors": {}}
    for backend in backends:
        start = time.perf_counter()
        predictor, error = None, None
        if main:
            try:
                predictor = _load(export_dir, backend, device)
            except Exception as e:
                error = f"cannot load it: {type(e).__name__}: {e}"
        results, run_error = _run(predictor, dataset if predictor is not None else [],
                                  evaluator)
        per_image = (time.perf_counter() - start) / max(1, len(dataset))
        adapted = None
        if backend == ONNX_INT8.backend:  # outside its budget: made again, some layers float
            need = main and bool(calibration_images) and not (error or run_error) and bool(
                entry["reference"]) and bool(compare_metrics(
                    entry["reference"], _flat(results), _int8_tolerance(int8_budget),
                    EVAL_CHECKED.get(backend))[1])
            if main_says(need):
                adapted = _adapt_int8(export_dir, dataset, evaluator, entry["reference"],
                                      calibration_images, _int8_tolerance(int8_budget), device,
                                      first=(_flat(results), per_image))
        if not main:
            continue
        error = error or run_error
        metrics = _flat(results)
        tolerance = EVAL_TOLERANCE[backend]
        if backend == ONNX_INT8.backend:
            tolerance = _int8_tolerance(int8_budget)
        entry["tolerance"][backend] = tolerance
        entry["seconds"][backend] = round(time.perf_counter() - start, 2)
        if error is None:
            entry["backends"][backend] = metrics
            if entry["reference"] is None:
                entry["training"] = dict(reference(list(metrics)))
                entry["reference"] = entry["training"]
                if not training_is_reference:
                    entry["reference"], entry["reference_from"] = dict(metrics), backend
            checked = EVAL_CHECKED.get(backend)
            worst, outside = compare_metrics(entry["reference"], metrics, tolerance, checked)
            adapt_error = None
            if adapted is not None:
                metrics, worst, outside, adapt_error = adapted
                entry["backends"][backend] = metrics
            entry["max_difference"][backend] = worst
            if checked:
                entry.setdefault("checked", {})[backend] = list(checked)
            if outside:
                got, ref = metrics.get(outside[0]), entry["reference"].get(outside[0])
                error = adapt_error or (
                    f"outside the tolerance of {tolerance} on {len(outside)} metric(s), "
                    f"e.g. {outside[0]} {_fmt(got)} vs {_fmt(ref)} in training")
        if error is not None:
            entry["failed"].append(backend)
            entry["errors"][backend] = error
            logger.error("The exported bundle's %s backend failed its evaluation on %s: %s.",
                         backend, dataset_name, error)
        else:
            logger.info("The exported bundle's %s backend on %s: %s (max difference to the "
                        "training evaluation %.4g, tolerance %s).", backend, dataset_name,
                        ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()
                                  if k.endswith(HEADLINE_METRICS) and v is not None),
                        entry["max_difference"][backend], tolerance)
    if not main:
        return None
    if not entry["training"]:
        entry["note"] = "no in-training evaluation of these weights to compare with"
    elif not training_is_reference:
        entry["note"] = ("the processes' BatchNorm statistics (buffers) differed, so the "
                         "in-training evaluation ran each share of the images on other weights: "
                         "it is recorded as 'training', and the backends are compared with the "
                         f"{entry['reference_from']} bundle")
    return entry


def evaluate_saved_bundle(export_dir: str, dataset_name: str, evaluator: DatasetEvaluator,
                          device: str = "cpu",
                          run_dir: Optional[str] = None, calibration_images: Sequence[str] = (),
                          int8_budget: Optional[float] = None) -> dict:
    """
    :func:`evaluate_bundle` for a bundle written earlier (``tools/export_model.py``): every
    backend it holds, compared with the reference its manifest recorded, else with the
    evaluation of its weights' iteration in ``run_dir``'s ``metrics.json`` (after_train's
    evaluation is stored under MAX_ITER, the iteration after the last); the manifest's
    ``evaluation`` entry is replaced atomically. Single process. ``calibration_images`` and
    ``int8_budget`` as :func:`evaluate_bundle`'s.

    Returns:
        dict: the new manifest.
    """
    manifest = read_manifest(export_dir)
    old = (manifest.get("evaluation") or {}).get("reference") or {}
    iteration = int((manifest.get("source") or {}).get(  # type: ignore[arg-type]
        "iteration", manifest.get("iteration")))  # a manifest records its iteration
    history = metrics_json_history(os.path.join(run_dir, METRICS_NAME)) if run_dir else None

    def reference(keys):
        if old:
            return {k: old[k] for k in keys if k in old}
        if history is None:
            return {}
        return metrics_at(history, keys, iteration) or metrics_at(history, keys, iteration + 1)

    entry = evaluate_bundle(export_dir, export_backends(manifest), dataset_name, evaluator,
                            reference, device=device, calibration_images=calibration_images,
                            int8_budget=int8_budget)
    manifest = dict(read_manifest(export_dir, False), evaluation=entry)  # INT8 may be new
    write_manifest(export_dir, manifest)
    return manifest
