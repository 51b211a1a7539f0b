"""PersistHook: decides *when* a training run writes its config, checkpoints and export."""

import copy
import logging
import os
import signal
import sys
import threading
import time
from typing import Union

from detectron2.config import CfgNode
from detectron2.engine.hooks import HookBase, PeriodicCheckpointer
from detectron2.utils import comm
from omegaconf import DictConfig

from ..artifacts.bundle import read_manifest
from ..artifacts.manifest import export_backends
from ..artifacts.view import metrics_json_history
from ..collective import main_says
from ..errors import D2PersistError, TrainingDivergedError
from ..export.bundle import dataset_metadata, write_export, write_manifest
from ..export.quantize import calibration_subset
from ..export.self_eval import evaluate_bundle, metrics_at
from ..files.atomic import remove_temp_files, write_json
from ..files.lock import note_run_started, unlock_run_folder
from ..files.mirror import Mirror, Uploader
from ..files.safe_load import safe_torch_load
from ..files.writer import BackgroundWriter
from ..layout import (
    BEST_NAME,
    BEST_RECORD,
    CONFIG_NAME,
    FINAL_NAME,
    LAST_CHECKPOINT,
    MANIFEST_NAME,
    METADATA_NAME,
    METRICS_NAME,
    ONNX_INT8,
    PERSIST_FILE,
    SIDECAR_SUFFIX,
    TRAINING_PLOT,
    checkpoint_name,
)
from ..runconfig import run_config
from .best import BestMetric, evaluation_value
from .checkpointer import PersistCheckpointer, all_finite, snapshot_state
from .resume import check_output_dir, hold_run_lock
from .state import data_state_to_resume, get_rng_state, set_rng_state

__all__ = ["PersistHook"]

logger = logging.getLogger(__name__)


def _stop_exception(signum):
    """What a stop on ``signum`` raises: KeyboardInterrupt for SIGINT, else SystemExit(128+N)."""
    return KeyboardInterrupt(128 + signum) if signum == signal.SIGINT else SystemExit(128 + signum)


def _train_loader(trainer):
    """The training data loader of a DefaultTrainer or SimpleTrainer."""
    return getattr(trainer, "data_loader", None)


class PersistHook(HookBase):
    """
    Persists a training run into its output folder.

    - ``before_train``: checks that the config loads back and writes ``config.yaml`` (and
      ``persist.yaml``); refuses to start a new run over an earlier run's checkpoints.
    - ``after_step``: writes ``model_{iter:07d}.pth`` when ``(iter + 1) % CHECKPOINT_PERIOD == 0``,
      or once ``PERSIST.CHECKPOINT_MINUTES`` have passed on the main process's clock since the
      last save; and, after a ``PERSIST.STOP_SIGNALS`` signal (SIGINT, SIGTERM) on any process,
      a checkpoint of the finished iteration before every process stops.
    - ``after_train``: only if training completed, ``model_final.pth`` and the inference export.
    - with ``PERSIST.BEST_METRIC``: after each evaluation that improves the metric,
      ``model_best.pth`` (the weights EvalHook just evaluated) and ``best.json``.

    **Where it runs.** Wherever it was registered, it moves itself to the *end* of the trainer's
    hook list at ``before_train``, on every process, and removes any ``PeriodicCheckpointer``
    (it writes each checkpoint once, in its place). So in every iteration it runs after
    ``PreciseBN`` (the checkpoint holds the precise statistics), after ``LRScheduler`` (and the
    stepped schedule), after ``EvalHook`` (the weights it saves are the ones just evaluated) and
    after ``PeriodicWriter``. Stock detectron2 adds ``PeriodicCheckpointer`` and
    ``PeriodicWriter`` on the main process only, so any slot defined by them differs between
    processes; the end of the list is the same slot on every process. Its collectives (the
    signal agreement every iteration, the gathering of RNG states and data positions at each
    save, the final-file check in ``after_train``) therefore come after every other hook's, in
    the same order on every process, and cannot pair with another hook's collective. The one
    cost: an evaluation that raises at a checkpoint iteration stops training before that
    iteration's checkpoint is written (the previous one is intact).

    Its state (the checkpoints it keeps, RNG states and data position of every process)
    travels in the checkpoint through ``state_dict``/``load_state_dict``. A run resumed with
    another number of processes gets the data position (the global batches do not depend on
    it, see :mod:`d2persist.training.state`), best model and retention back, not the per-process
    RNGs.

    **One writer.** From ``before_train`` (PersistTrainer and the tools: from start-up) to the
    end of ``after_train`` the main process holds the run lock of the output folder; another
    training into that folder stops before it writes anything.
    """

    def __init__(self, cfg: Union[CfgNode, DictConfig]) -> None:
        """
        Args:
            cfg: the run's config: a ``CfgNode`` (``cfg.PERSIST`` optional, see
                :func:`add_persist_config`) or a LazyConfig (``train.persist`` optional).
        """
        self.run = run_config(cfg)
        self.options = self.run.options
        self._writer = BackgroundWriter(enabled=bool(self.options["ASYNC"]))
        self._checkpointer = None
        self._kept = []
        self._resume_states = None
        self._pending_resume = None
        self._rng_to_restore = None
        self._last_saved = None
        self._spare = None  # the last snapshot, once written: the next one's buffers
        self._signal = None
        self._old_handlers = {}
        stops = self.options["STOP_SIGNALS"] if self.options["SAVE_ON_INTERRUPT"] else []
        self._stop_signals = [getattr(signal, name) for name in stops]
        minutes = self.options["CHECKPOINT_MINUTES"]
        self._save_every = minutes * 60 if minutes > 0 else None  # seconds
        self._last_save_time = None  # monotonic time of the last save (or of the start)
        metric = self.options["BEST_METRIC"]
        self._best = BestMetric(metric, self.options["BEST_MODE"]) if metric else None
        self._training_keys = None  # what training itself puts into the event storage
        self._uploader = None  # the mirror's, on the main process (PERSIST.MIRROR)
        self._plotter = None  # the thread drawing training.png (PERSIST.PLOT)
        self._plot_again = False  # an evaluation came while it drew

    # -- place in the hook list ----------------------------------------------------------------

    def _take_place(self):
        """
        Move to the end of the trainer's hook list and drop ``PeriodicCheckpointer``. The list
        is replaced, not changed in place: the loop now calling ``before_train`` goes on over
        the old one, so every other hook still gets its ``before_train`` exactly once.
        """
        others = [h for h in self.trainer._hooks if h is not self]
        if any(isinstance(h, PersistHook) for h in others):
            raise D2PersistError(
                "Two PersistHooks are registered on this trainer (PersistTrainer and "
                "d2persist's LazyConfig loop add one themselves); register only one."
            )
        kept = [h for h in others if not isinstance(h, PeriodicCheckpointer)]
        if len(kept) < len(others):
            logger.info("PersistHook writes the checkpoints: PeriodicCheckpointer removed.")
        self.trainer._hooks = kept + [self]

    # -- before_train --------------------------------------------------------------------------

    def before_train(self):
        self._take_place()
        out = self.run.output_dir
        self.run.check()  # raises ConfigRoundTripError, on every process alike
        hold_run_lock(out)  # this process already holds it when PersistTrainer resumed
        if comm.is_main_process():  # the folder the main process writes is the one that counts
            check_output_dir(out, self.trainer.start_iter)
            note_run_started(out)  # a worker its launcher restarts may resume it now
            os.makedirs(out, exist_ok=True)
            remove_temp_files(out)
            self.run.write(out)
            write_json(
                os.path.join(out, METADATA_NAME), dataset_metadata(self.run.train_dataset_names())
            )
            if self.options["MIRROR"]:
                self._uploader = Uploader(Mirror(self.options["MIRROR"]))
                self._mirror(CONFIG_NAME, PERSIST_FILE, METADATA_NAME)
        self._checkpointer = PersistCheckpointer(self.trainer.model, out, trainer=self.trainer)
        self._apply_pending_resume()
        if self._best is not None and self.trainer.start_iter > 0 and comm.is_main_process():
            self._best.adopt(os.path.join(out, BEST_RECORD))
        self._install_signal_handlers()
        self._last_save_time = time.monotonic()

    def _apply_pending_resume(self):
        states, self._pending_resume = self._pending_resume, None
        if not states:
            return
        loader = _train_loader(self.trainer)
        data = data_state_to_resume(states)
        if data is not None and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(data)
        if len(states) != comm.get_world_size():
            logger.warning(
                "The checkpoint was written by %d processes, this run has %d: the data stream, "
                "LR schedule, optimizer, best model and retention continue where they stopped, "
                "and each iteration's global batch holds the same images; still different from "
                "an unchanged run: each process's RNG (e.g. the model's proposal and ROI "
                "sampling), BatchNorm statistics computed per process, and the order of "
                "gradient reductions.", len(states), comm.get_world_size(),
            )
            return
        mine = states[comm.get_rank()]
        set_rng_state(mine["rng"])
        self._rng_to_restore = mine["rng"]  # as after a save: hooks' before_train may draw

    # -- signals -------------------------------------------------------------------------------

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self._stop_signals:
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self):
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}

    def _on_signal(self, signum, frame):
        if self._signal is not None:  # a second signal: stop now, without the checkpoint
            self._restore_signal_handlers()
            raise _stop_exception(signum)
        self._signal = signum
        logger.warning(
            "Received %s: finishing iteration %d, saving a checkpoint, then stopping "
            "(send it again to stop at once).", signal.Signals(signum).name, self.trainer.iter,
        )

    def _agree(self):
        """
        ``(signal, time_due)``: the stop signal received by any process (or None), and whether
        ``CHECKPOINT_MINUTES`` have passed on the main process's clock. One collective per
        iteration when distributed (and either is on), the same on every process.
        """
        sig = self._signal or 0
        due = (
            self._save_every is not None
            and comm.is_main_process()
            and time.monotonic() - self._last_save_time >= self._save_every
        )
        if comm.get_world_size() > 1 and (self._stop_signals or self._save_every is not None):
            said = comm.all_gather((sig, due))
            sig, due = max(s for s, _ in said), said[0][1]
        return sig or None, due

    # -- after_step ----------------------------------------------------------------------------

    def before_step(self):
        # Hooks after this one (evaluation, writers) may draw random numbers after a save; undo
        # that, so training continues from exactly the RNG state the checkpoint holds.
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def after_step(self):
        self._writer.check()
        it = self.trainer.iter
        period = self.run.checkpoint_period
        sig, timed = self._agree()
        # the best is decided first, so that a checkpoint of this iteration knows it
        improved = self._best is not None and self._consider_best(it)
        periodic = period > 0 and (it + 1) % period == 0
        if timed and not periodic and not sig:
            logger.info("%s minutes since the last save: checkpoint after iteration %d "
                        "(PERSIST.CHECKPOINT_MINUTES).", self.options["CHECKPOINT_MINUTES"], it)
        if periodic or timed or sig:  # with a new best, model_best.pth is named first
            self._save(checkpoint_name(it), it, best=improved)
        elif improved:
            self._save_best(it)
        if self._evaluated_after(it):
            self._plot()
        if sig:
            self._writer.wait()
            logger.warning(
                "Stopped by %s after iteration %d; checkpoint %s saved. Resume with --resume.",
                signal.Signals(sig).name, it, checkpoint_name(it),
            )
            raise _stop_exception(sig)

    # -- best ----------------------------------------------------------------------------------

    def _evaluated_after(self, it):
        """Whether EvalHook evaluated after iteration ``it`` (in its after_step)."""
        period = self.run.eval_period
        return period > 0 and (it + 1) % period == 0 and it + 1 != self.trainer.max_iter

    def _consider_best(self, it, final=False):
        """
        On the main process (the one evaluation results reach), after an evaluation: whether
        it improved the best so far, which is then updated.
        """
        if not comm.is_main_process():
            return False
        latest = self.trainer.storage.latest()
        if not final and not self._evaluated_after(it):
            if self._training_keys is None:
                self._training_keys = {k for k, (_, i) in latest.items() if i == it}
            return False
        # after_train's evaluation is stored under the storage's iteration then (max_iter)
        at = self.trainer.storage.iter if final else it
        value = evaluation_value(latest, self._best.metric, at, self._training_keys or ())
        if value is None or not self._best.improves(value):
            return False
        self._best.update(value, it)
        logger.info("New best %s = %s after iteration %d: writing %s.",
                    self._best.metric, value, it, BEST_NAME)
        return True

    def _save_best(self, iteration):
        """Write ``model_best.pth`` (a snapshot) and ``best.json`` in the background."""
        if not comm.is_main_process():
            return
        self._writer.submit(self._write_best, self._snapshot(iteration), self._best.record())

    def _write_best(self, data, record):
        self._check_finite(data)
        self._checkpointer.write(BEST_NAME, data, tag=False)
        write_json(os.path.join(self.run.output_dir, BEST_RECORD), record)
        self._mirror(BEST_NAME, BEST_NAME + SIDECAR_SUFFIX, BEST_RECORD)

    def _link_best(self, saved, record, mirror=True):
        """``model_best.pth`` as a second name of the checkpoint ``saved``, then best.json."""
        self._checkpointer.link(saved, BEST_NAME, tag=False)
        write_json(os.path.join(self.run.output_dir, BEST_RECORD), record)
        if mirror:
            self._mirror(BEST_NAME, BEST_NAME + SIDECAR_SUFFIX, BEST_RECORD)

    # -- training.png --------------------------------------------------------------------------

    def _plot(self):
        """
        On the main process, redraw ``training.png`` from a background thread (matplotlib's
        object API, no pyplot): one drawing at a time; an evaluation that comes while one runs
        gets the next. The file a finished drawing wrote is mirrored from here.
        """
        if not self.options["PLOT"] or not comm.is_main_process():
            return
        if self._plotter is not None and self._plotter.is_alive():
            self._plot_again = True
            return
        if self._plotter is not None:
            self._mirror(TRAINING_PLOT)
        self._plot_again = False
        self._plotter = threading.Thread(target=self._draw, name="d2persist-plot", daemon=True)
        self._plotter.start()

    def _draw(self):
        from ..artifacts.plot import plot_run
        from ..artifacts.view import RunView

        try:
            plot_run(RunView(self.run.output_dir, "run"),
                     os.path.join(self.run.output_dir, TRAINING_PLOT))
        except Exception as e:  # a picture never stops training
            logger.warning("Could not draw %s: %s: %s", TRAINING_PLOT, type(e).__name__, e)

    def _final_plot(self):
        """The picture of the whole run, once training ended (waits for it)."""
        if not self.options["PLOT"] or not comm.is_main_process():
            return
        if self._plotter is not None:
            self._plotter.join()
        self._plotter = None
        self._plot()
        if self._plotter is not None:
            self._plotter.join()
            self._mirror(TRAINING_PLOT)

    # -- mirror --------------------------------------------------------------------------------

    def _mirror(self, *names, folder=None, remove=(), tag=None):
        """
        Queue one upload job to the mirror: ``names`` (files of the output folder, or of its
        ``folder``) in this order, then ``last_checkpoint`` naming ``tag`` (as it is now, not
        as the local file may say when the upload runs), then the removals. Training never
        waits for it.
        """
        if self._uploader is None:
            return
        base = os.path.join(self.run.output_dir, folder) if folder else self.run.output_dir
        prefix = f"{folder}/" if folder else ""
        steps = [(prefix + n, os.path.join(base, n)) for n in names]
        if tag is not None:
            steps.append((LAST_CHECKPOINT, tag.encode("utf-8")))
        steps += [(prefix + n, None) for n in remove]
        self._uploader.submit(steps)

    def _mirror_metrics(self):
        """``metrics.json`` as it is now (a line still being appended is skipped by readers)."""
        if os.path.isfile(os.path.join(self.run.output_dir, METRICS_NAME)):
            self._mirror(METRICS_NAME)

    def _finish_mirror(self):
        if self._uploader is None:
            return
        self._mirror_metrics()
        waited = self._uploader.wait()
        failures = self._uploader.failures
        logger.info(
            "Mirror %s: waited %.1f s for the last uploads%s.", self._uploader.mirror.url, waited,
            f"; {failures} upload(s) failed, the local run is complete" if failures else "",
        )

    # -- checkpoints ---------------------------------------------------------------------------

    def _save(self, basename, iteration, best=False):
        """
        Snapshot the state of ``iteration`` on this thread; write it in the background. With
        ``best``, the same job names it ``model_best.pth`` too before it tags it in
        ``last_checkpoint``: a checkpoint recording a best is never resumed from before
        ``model_best.pth`` and ``best.json`` are on disk.
        """
        local = {"rng": get_rng_state(), "data": None}
        loader = _train_loader(self.trainer)
        if hasattr(loader, "state_dict"):
            local["data"] = loader.state_dict()
        self._resume_states = comm.all_gather(local) if comm.get_world_size() > 1 else [local]
        self._rng_to_restore = local["rng"]
        self._last_saved = iteration
        self._last_save_time = time.monotonic()
        if not comm.is_main_process():
            return
        if basename != FINAL_NAME:
            self._kept.append(basename)
        data = self._snapshot(iteration)
        self._writer.submit(self._write, basename, data, self._best.record() if best else None)

    def _snapshot(self, iteration):
        """
        The state of ``iteration``, once the write in flight is done (with ASYNC, copied into
        the buffers of the previous snapshot).
        """
        self._writer.wait()
        data = snapshot_state(
            self._checkpointer, copy=self._writer.enabled, into=self._spare, iteration=iteration
        )
        data["trainer"]["iteration"] = iteration
        self._spare = data if self._writer.enabled else None
        return data

    @staticmethod
    def _check_finite(data):
        if not all_finite(data["model"]):
            raise FloatingPointError(
                f"Weights after iteration {data['iteration']} hold NaN or Inf; not saving them, "
                f"and {LAST_CHECKPOINT} still names the last good checkpoint."
            )

    def _write(self, basename, data, best_record=None):
        self._check_finite(data)
        self._checkpointer.write(basename, data, tag=best_record is None)
        best = ()
        if best_record is not None:
            self._link_best(basename, best_record, mirror=False)
            self._checkpointer.tag_last_checkpoint(basename)
            best = (BEST_NAME, BEST_NAME + SIDECAR_SUFFIX, BEST_RECORD)
        # the checkpoint and its sha256 before anything names it
        self._mirror(basename, basename + SIDECAR_SUFFIX, *best, tag=basename)
        self._mirror_metrics()  # a job of its own: the mirror's ls and plot read it
        self._prune()

    def _prune(self):
        keep = int(self.options["MAX_TO_KEEP"])
        if keep <= 0 or len(self._kept) <= keep:
            return
        old, self._kept = self._kept[:-keep], self._kept[-keep:]
        for name in old:
            if name != FINAL_NAME:
                self._checkpointer.remove(name)
                self._mirror(remove=(name, name + SIDECAR_SUFFIX))

    # -- after_train ---------------------------------------------------------------------------

    def after_train(self):
        # the trainer calls after_train in the ``finally`` of its loop: an exception ending
        # training is still in flight here
        failure = sys.exc_info()[1]
        try:
            self._after_train()
        finally:
            self._spare = None  # the snapshot buffers: training is over
            try:
                self._final_plot()
            except Exception:  # a picture never hides why training ended
                logger.exception("Could not draw %s:", TRAINING_PLOT)
            try:
                self._finish_mirror()  # also after a failure or a signal: what was written
            finally:
                if comm.is_main_process():
                    unlock_run_folder(self.run.output_dir)
        if isinstance(failure, FloatingPointError) and not isinstance(
            failure, TrainingDivergedError
        ):
            raise self._diverged(failure) from failure

    _HINTS = {
        "yacs": "a longer warm-up (SOLVER.WARMUP_ITERS), a lower SOLVER.BASE_LR, or gradient "
                "clipping (SOLVER.CLIP_GRADIENTS.ENABLED True)",
        "lazy": "a longer warm-up (lr_multiplier.warmup_length), a lower optimizer.lr, or "
                "gradient clipping (train.clip_grad)",
    }

    def _diverged(self, error):
        """The sentence for a run that produced NaN/Inf (detectron2's or the NaN guard's)."""
        try:
            with open(os.path.join(self.run.output_dir, LAST_CHECKPOINT), encoding="utf-8") as f:
                last = f.read().strip()
        except OSError:
            last = ""
        where = (f"{LAST_CHECKPOINT} names {last}, the newest weights saved before it (all "
                 "finite), and --resume continues from it" if last
                 else "no checkpoint was saved before it")
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".!")
        return TrainingDivergedError(
            f"Training diverged (NaN or Inf) at iteration {self.trainer.iter} ({reason}); "
            f"{where}. What usually helps: {self._HINTS.get(self.run.kind, self._HINTS['yacs'])}."
        )

    def _after_train(self):
        self._restore_signal_handlers()
        trainer = self.trainer
        completed = trainer.iter >= trainer.max_iter
        try:
            self._writer.wait()
        except Exception:
            if completed:
                raise
            logger.exception("The last checkpoint write failed:")
            return
        if not completed or self._checkpointer is None:
            return  # failed or interrupted: no model_final, no export
        out = self.run.output_dir
        trained = trainer.start_iter < trainer.max_iter
        last = trainer.max_iter - 1
        if self._last_saved == last:
            if comm.is_main_process():
                self._checkpointer.link(checkpoint_name(last), FINAL_NAME)
                self._mirror(FINAL_NAME, FINAL_NAME + SIDECAR_SUFFIX, tag=FINAL_NAME)
        elif trained or not main_says(os.path.isfile(os.path.join(out, FINAL_NAME))):
            self._save(FINAL_NAME, last)
            self._writer.wait()
        # EvalHook's final evaluation ran before this hook's after_train (also when a resumed
        # run had nothing left to train: then it re-evaluates the last checkpoint's weights)
        if self._best is not None and self._consider_best(last, final=True):
            if comm.is_main_process():
                self._writer.submit(self._link_best, FINAL_NAME, self._best.record())
                self._writer.wait()
        if self.options["EXPORT"]:
            manifest = None
            if comm.is_main_process() and (trained or not os.path.isfile(
                    os.path.join(self.run.export_dir, MANIFEST_NAME))):
                manifest = self.export()
            if self.options["EXPORT_EVAL"] and main_says(manifest is not None):
                manifest = self.evaluate_export(manifest)  # collective
            if manifest is not None:
                folder = os.path.relpath(self.run.export_dir, self.run.output_dir)
                self._mirror(*manifest["files"], MANIFEST_NAME, folder=folder)  # manifest last
        comm.synchronize()

    def evaluate_export(self, manifest):
        """
        Evaluate the bundle just written, through each backend it holds, on the first test
        dataset with the trainer's evaluator (:func:`d2persist.export.self_eval.evaluate_bundle`),
        and add the ``evaluation`` entry to its manifest. Collective; the manifest (the main
        process's; None on the others) is returned.
        """
        run, trainer = self.run, self.trainer
        name = run.test_dataset_name()
        evaluator = run.build_evaluator(trainer, name) if name else None
        if not main_says(evaluator is not None):
            if comm.is_main_process() and name:
                logger.info("No evaluator for %s: the export is not evaluated.", name)
            return manifest
        backends = main_says(export_backends(manifest) if manifest else None)
        source = (manifest or {}).get("source") or {}
        at = source.get("iteration")
        if source.get("from") != "best" or at == trainer.max_iter - 1:
            at = trainer.storage.iter  # where after_train's evaluation is stored
        agree = self._states_agree()
        if not agree and comm.is_main_process():
            logger.warning("The processes' BatchNorm statistics differ (each computes its own, "
                           "as DefaultTrainer's DDP does not broadcast buffers), so the "
                           "in-training evaluation was not of the exported weights alone; the "
                           "export's backends are compared with its PyTorch bundle instead.")
        entry = evaluate_bundle(run.export_dir, backends, name, evaluator,
                                lambda keys: self._evaluation_at(at, keys), device=run.device,
                                training_is_reference=agree,
                                calibration_images=self._calibration_images()
                                if comm.is_main_process() else (),
                                int8_budget=self.options["INT8_BUDGET"])
        if manifest is None:
            return None
        # read again: an INT8 model outside its budget was made again (files, onnx_int8)
        manifest = dict(read_manifest(run.export_dir, False), evaluation=entry)
        write_manifest(run.export_dir, manifest)
        return manifest

    def _states_agree(self):
        """Whether every process holds the same buffers (BatchNorm statistics); collective."""
        if comm.get_world_size() == 1:
            return True
        import hashlib

        h = hashlib.sha256()
        for name, buf in self._checkpointer.model.named_buffers():
            h.update(name.encode())
            h.update(buf.detach().to("cpu").contiguous().numpy().tobytes())
        return len(set(comm.all_gather(h.hexdigest()))) == 1

    def _evaluation_at(self, iteration, keys):
        """The metrics ``keys`` stored under ``iteration``: in this process, else metrics.json."""
        histories = self.trainer.storage.histories()
        found = metrics_at(lambda k: histories[k].values() if k in histories else None, keys,
                           iteration)
        if not found:  # evaluated before a resume
            found = metrics_at(metrics_json_history(os.path.join(self.run.output_dir,
                                                                 METRICS_NAME)), keys, iteration)
        return found

    def export(self) -> dict:
        """
        Write the inference bundle to ``PERSIST.EXPORT_DIR``: of the model as it is now, or with
        ``PERSIST.EXPORT_FROM`` "best", of the weights in ``model_best.pth``.
        """
        model, iteration = self._checkpointer.model, self.trainer.max_iter - 1
        source = {"from": "final"}
        if self.options["EXPORT_FROM"] == "best":
            if self._best is None or self._best.iteration is None:
                logger.warning("No evaluation gave %s: exporting the final weights.",
                               self.options["BEST_METRIC"])
            else:
                state = safe_torch_load(os.path.join(self.run.output_dir, BEST_NAME))["model"]
                model = copy.deepcopy(model)
                model.load_state_dict(state)
                iteration = self._best.iteration
                source = {"from": "best", "metric": self._best.metric, "mode": self._best.mode,
                          "value": self._best.value}
        return write_export(self.run, model, self.run.export_dir, iteration, source=source,
                            calibration_images=self._calibration_images())

    def _calibration_images(self):
        """With EXPORT_FORMATS "onnx-int8": CALIBRATION_IMAGES files of the training dataset."""
        names = self.run.train_dataset_names()
        if ONNX_INT8.format not in self.options["EXPORT_FORMATS"] or not names:
            return []
        from detectron2.data import DatasetCatalog

        files = [d["file_name"] for d in DatasetCatalog.get(names[0]) if "file_name" in d]
        return calibration_subset(files, self.options["CALIBRATION_IMAGES"])

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        state = {"kept": list(self._kept), "resume": self._resume_states}
        if self._best is not None:
            state["best"] = self._best.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._kept = list(state_dict.get("kept", []))
        self._pending_resume = state_dict.get("resume")
        if self._best is not None:
            self._best.load_state_dict(state_dict.get("best") or {})
