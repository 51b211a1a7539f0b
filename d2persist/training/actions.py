"""
What PersistHook does, one function per action; :class:`~d2persist.training.hook.PersistHook`
decides *when* to call each. Start a run folder, say why a run diverged, export the run and
have the export evaluate itself with the run's evaluator.
"""

import copy
import hashlib
import logging
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from detectron2.utils import comm

from ..artifacts.bundle import read_manifest
from ..artifacts.checkpoints import evaluated_weights
from ..artifacts.manifest import export_backends
from ..artifacts.view import RunView, metrics_json_history
from ..collective import main_says
from ..errors import ConfigError, D2PersistError, TrainingDivergedError
from ..export.bundle import dataset_metadata, write_export, write_manifest
from ..export.quantize import calibration_subset
from ..export.self_eval import evaluate_bundle, metrics_at
from ..files.atomic import remove_temp_files, write_json
from ..files.lock import note_run_started
from ..files.mirror import RunMirror, check_mirror
from ..files.safe_load import safe_yaml_load, safe_yaml_loads
from ..layout import (
    BEST_NAME,
    CONFIG_NAME,
    CONFIG_PICKLE,
    METADATA_NAME,
    METRICS_NAME,
    ONNX_INT8,
    PERSIST_FILE,
)
from ..runconfig import flatten_config
from .best import BestMetric
from .resume import check_output_dir

if TYPE_CHECKING:
    import torch
    from detectron2.engine import TrainerBase

    from ..runconfig import RunConfig

__all__ = [
    "start_run_folder",
    "check_run_folder",
    "diverged_error",
    "calibration_images",
    "export_run",
    "exported_weights",
    "evaluate_run_export",
]

logger = logging.getLogger(__name__)


def start_run_folder(run: "RunConfig", start_iter: int) -> Optional[RunMirror]:
    """
    On the main process, before training (PersistHook runs it through
    :func:`~d2persist.collective.main_decides`, so that every process hears its errors): refuse
    what :func:`check_run_folder` refuses, note that the run started (a restarted worker may
    resume it), write ``config.yaml``, ``persist.yaml`` and ``metadata.json``, and start the
    mirror.

    Returns:
        RunMirror or None: the mirror's uploads (``PERSIST.MIRROR``), with the config queued.
    """
    out = run.output_dir
    check_run_folder(run, start_iter)
    if start_iter > 0:
        _note_config_changes(run, out)
    if run.checkpoint_period == 0 and not run.options["CHECKPOINT_MINUTES"]:
        logger.warning("%s is 0 and PERSIST.CHECKPOINT_MINUTES 0: no checkpoint before the "
                       "last iteration, so a run stopped before its end keeps nothing to "
                       "resume from.", run.PERIOD_KEY)
    note_run_started(out)
    os.makedirs(out, exist_ok=True)
    remove_temp_files(out)
    run.write(out)
    write_json(os.path.join(out, METADATA_NAME), dataset_metadata(run.train_dataset_names()))
    if not run.options["MIRROR"]:
        return None
    mirror = RunMirror(run.options["MIRROR"], out)
    # (a LazyConfig's pickle fallback last: where there is none, the job ends there)
    mirror.upload(CONFIG_NAME, PERSIST_FILE, METADATA_NAME, CONFIG_PICKLE)
    return mirror


def check_run_folder(run: "RunConfig", start_iter: int) -> None:
    """
    What the run's folder must be before anything is written there: no earlier run's
    checkpoints under a new run, not an export bundle, room for the export, a mirror of its
    own. Main process only: every process hears it through
    :func:`~d2persist.collective.main_decides`.

    Raises:
        OutputDirNotEmptyError: see :func:`~d2persist.training.resume.check_output_dir`.
        ConfigError: a file where PERSIST.EXPORT_DIR goes; a mirror refused by
            :func:`~d2persist.files.mirror.check_mirror`.
    """
    check_output_dir(run.output_dir, start_iter)
    if os.path.exists(run.export_dir) and not os.path.isdir(run.export_dir):
        raise ConfigError(f"PERSIST.EXPORT_DIR {run.export_dir} is a file: the export needs a "
                          "folder there.")
    if run.options["MIRROR"]:
        check_mirror(run.options["MIRROR"], run.output_dir)


def _note_config_changes(run: "RunConfig", out: str) -> None:
    """
    On resume, say which keys of the config differ from the run's ``config.yaml`` (which then
    records the new one): a change made on purpose (more iterations) or not (another file).
    Not for a LazyConfig saved with detectron2's pickle fallback: its text does not load back.
    """
    try:
        saved = safe_yaml_load(os.path.join(out, CONFIG_NAME))
        now = safe_yaml_loads(run.dump())
    except (OSError, D2PersistError, ValueError):  # none (a stock run), or not comparable
        return
    if not isinstance(saved, dict) or not isinstance(now, dict):
        return
    before, after = flatten_config(saved), flatten_config(now)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                     and not k.startswith(("PERSIST.", "train.persist.")))
    if changed:
        shown = ", ".join(f"{k} ({before.get(k)!r} -> {after.get(k)!r})" for k in changed[:8])
        more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
        logger.warning("Resuming %s with a config that differs from its %s in %s%s; %s now "
                       "records this one.", out, CONFIG_NAME, shown, more, CONFIG_NAME)


#: what usually helps a run that diverged, in each config system's keys
DIVERGENCE_HINTS = {
    "yacs": "a longer warm-up (SOLVER.WARMUP_ITERS), a lower SOLVER.BASE_LR, or gradient "
            "clipping (SOLVER.CLIP_GRADIENTS.ENABLED True)",
    # (detectron2's LazyConfig loop has no gradient clipping option: none is named)
    "lazy": "a longer warm-up (lr_multiplier.warmup_length) or a lower optimizer.lr",
}


def diverged_error(run: "RunConfig", iteration: int,
                   error: BaseException) -> TrainingDivergedError:
    """The one sentence for a run that produced NaN/Inf (detectron2's or the NaN guard's)."""
    last = RunView(run.output_dir, "run").last_checkpoint()
    where = (f"last_checkpoint names {last}, the newest weights saved before it (all "
             "finite), and --resume continues from it" if last
             else "no checkpoint was saved before it")
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".!")
    hint = DIVERGENCE_HINTS.get(run.kind, DIVERGENCE_HINTS["yacs"])
    return TrainingDivergedError(
        f"Training diverged (NaN or Inf) at iteration {iteration} ({reason}); {where}. "
        f"What usually helps: {hint}."
    )


def calibration_images(run: "RunConfig") -> List[str]:
    """With EXPORT_FORMATS "onnx-int8": CALIBRATION_IMAGES files of the training dataset."""
    names = run.train_dataset_names()
    if ONNX_INT8.format not in run.options["EXPORT_FORMATS"] or not names:
        return []
    from detectron2.data import DatasetCatalog

    files = [d["file_name"] for d in DatasetCatalog.get(names[0]) if "file_name" in d]
    return calibration_subset(files, run.options["CALIBRATION_IMAGES"])


def exported_weights(run: "RunConfig", iteration: int,
                     best: Optional[BestMetric] = None) -> Tuple[int, str]:
    """
    Which weights :func:`export_run` exports, as its manifest records them: ``(iteration,
    "final")``, or with ``PERSIST.EXPORT_FROM`` "best" and a best evaluated, ``(its iteration,
    "best")``.
    """
    if run.options["EXPORT_FROM"] == "best" and best is not None and best.iteration is not None:
        return best.iteration, "best"
    return iteration, "final"


def export_run(run: "RunConfig", model: "torch.nn.Module", iteration: int,
               best: Optional[BestMetric] = None, calibration: Sequence[str] = (),
               ema: Optional[dict] = None) -> dict:
    """
    Write the run's inference bundle to ``PERSIST.EXPORT_DIR``: of ``model`` as it is now (the
    weights of ``iteration``), or with ``PERSIST.EXPORT_FROM`` "best", of the weights the run
    evaluated in ``model_best.pth`` (verified against its sidecar; its EMA average when the
    run evaluates that), loaded into a copy of ``model``; ``calibration``:
    :func:`calibration_images` (for the INT8 model); ``ema``: ``{"decay", "warmup", "updates"}``
    when ``model`` holds EMA weights (recorded in the manifest's ``source``).

    Returns:
        dict: the bundle's manifest.
    """
    source: Dict[str, Any] = {"from": "final"}
    if run.options["EXPORT_FROM"] == "best":
        if exported_weights(run, iteration, best)[1] != "best":
            logger.warning("No evaluation gave %s: exporting the final weights.",
                           run.options["BEST_METRIC"])
        else:
            assert best is not None and best.iteration is not None
            state, ema = evaluated_weights(
                RunView(run.output_dir, "run").load_checkpoint(BEST_NAME))
            model = copy.deepcopy(model)
            model.load_state_dict(state)
            iteration = best.iteration
            source = {"from": "best", "metric": best.metric, "mode": best.mode,
                      "value": best.value}
    if ema is not None:
        source["weights"] = "ema"
        source["ema"] = ema
    return write_export(run, model, run.export_dir, iteration, source=source,
                        calibration_images=list(calibration))


def _states_agree(model: "torch.nn.Module") -> bool:
    """Whether every process holds the same buffers (BatchNorm statistics); collective."""
    if comm.get_world_size() == 1:
        return True
    h = hashlib.sha256()
    for name, buf in model.named_buffers():
        h.update(name.encode())
        h.update(buf.detach().to("cpu").contiguous().numpy().tobytes())
    return len(set(comm.all_gather(h.hexdigest()))) == 1


def _evaluation_at(trainer, output_dir, iteration, keys):
    """The metrics ``keys`` stored under ``iteration``: in this process, else metrics.json."""
    histories = trainer.storage.histories()
    found = metrics_at(lambda k: histories[k].values() if k in histories else None, keys,
                       iteration)
    if not found:  # evaluated before a resume
        found = metrics_at(metrics_json_history(os.path.join(output_dir, METRICS_NAME)), keys,
                           iteration)
    return found


def evaluate_run_export(run: "RunConfig", trainer: "TrainerBase", model: "torch.nn.Module",
                        manifest: Optional[dict], calibration: Sequence[str] = ()
                        ) -> Optional[dict]:
    """
    Evaluate the bundle just written, through each backend it holds, on the first test dataset
    with the trainer's evaluator (:func:`d2persist.export.self_eval.evaluate_bundle`), and add
    the ``evaluation`` entry to its manifest. Collective; ``manifest`` and ``calibration`` (for
    an INT8 model made again within its budget) are the main process's (None and empty on the
    others), and so is the manifest returned.
    """
    name = run.test_dataset_name()
    evaluator = run.build_evaluator(trainer, name) if name else None
    if not main_says(evaluator is not None):
        if comm.is_main_process() and name:
            logger.info("No evaluator for %s: the export is not evaluated.", name)
        return manifest
    backends = main_says(export_backends(manifest) if manifest else None)
    # every process has the same config, and the main process exported: it has the manifest
    assert name is not None and backends is not None
    source = (manifest or {}).get("source") or {}
    at = source.get("iteration")
    if source.get("from") != "best" or at == trainer.max_iter - 1:
        at = trainer.storage.iter  # where after_train's evaluation is stored
    agree = _states_agree(model)
    if not agree and comm.is_main_process():
        logger.warning("The processes' BatchNorm statistics differ (each computes its own, "
                       "as DefaultTrainer's DDP does not broadcast buffers), so the "
                       "in-training evaluation was not of the exported weights alone; the "
                       "export's backends are compared with its PyTorch bundle instead.")
    entry = evaluate_bundle(run.export_dir, backends, name, evaluator,
                            lambda keys: _evaluation_at(trainer, run.output_dir, at, keys),
                            device=run.device, training_is_reference=agree,
                            calibration_images=calibration,
                            int8_budget=run.options["INT8_BUDGET"])
    if manifest is None:
        return None
    # read again: an INT8 model outside its budget was made again (files, onnx_int8)
    manifest = dict(read_manifest(run.export_dir, False), evaluation=entry)
    write_manifest(run.export_dir, manifest)
    return manifest
