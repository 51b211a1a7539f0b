"""PersistHook: decides *when* a training run writes its config, checkpoints and export."""

import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Set, Union

from detectron2.config import CfgNode
from detectron2.engine.hooks import BestCheckpointer, EvalHook, HookBase, PeriodicCheckpointer
from detectron2.utils import comm
from omegaconf import DictConfig

from ..artifacts.bundle import read_manifest
from ..artifacts.checkpoints import checkpoint_sha256
from ..artifacts.plot import BackgroundPlot
from ..artifacts.view import EVAL_TASKS, RunView
from ..collective import main_decides, main_says
from ..errors import ConfigError, D2PersistError, EarlyStopped, TrainingDivergedError
from ..files.atomic import write_json
from ..files.lock import unlock_run_folder
from ..files.mirror import RunMirror
from ..files.writer import BackgroundWriter
from ..layout import (
    BEST_NAME,
    BEST_RECORD,
    EMA_STATE_KEY,
    EVALUATIONS_NAME,
    FINAL_NAME,
    LAST_CHECKPOINT,
    MANIFEST_NAME,
    SIDECAR_SUFFIX,
    TRAINING_PLOT,
    checkpoint_name,
)
from ..runconfig import run_config
from .actions import (
    calibration_images,
    diverged_error,
    evaluate_run_export,
    export_run,
    exported_weights,
    start_run_folder,
)
from .before_eval import BeforeEvaluation
from .best import BestMetric, EarlyStopping, EvaluationLog, evaluation_value
from .checkpointer import PersistCheckpointer, all_finite, snapshot_state
from .ema import ModelEMA
from .resume import check_resume_point, hold_run_lock
from .state import data_state_to_resume, get_rng_state, set_rng_state

__all__ = ["PersistHook"]

logger = logging.getLogger(__name__)


def _stop_exception(signum):
    """What a stop on ``signum`` raises: KeyboardInterrupt for SIGINT, else SystemExit(128+N)."""
    return KeyboardInterrupt(128 + signum) if signum == signal.SIGINT else SystemExit(128 + signum)


def _train_loader(trainer):
    """The training data loader of a DefaultTrainer or SimpleTrainer."""
    return getattr(trainer, "data_loader", None)


#: the hooks whose stop-signal handlers are installed in this process (at most one in practice)
_INSTALLED: List["PersistHook"] = []


#: the signal mask the forking thread had before :func:`_block_before_fork`
_FORK = threading.local()


def _block_before_fork():
    # Block the stop signals across a fork while the handlers are installed: a signal sent to
    # the child before _restore_handlers_in_child runs would reach this handler's C part there,
    # and once the handler is restored, CPython drops it ("Signal 15 ignored due to race
    # condition"): a Pool worker SIGTERMed at once by terminate() then waited forever.
    sigs = {sig for hook in _INSTALLED for sig in hook._old_handlers}
    _FORK.mask = signal.pthread_sigmask(signal.SIG_BLOCK, sigs) if sigs else None


def _unblock_after_fork():
    # A signal that came meanwhile is delivered now, here as there. (One whose Python handler
    # raises, e.g. a second stop signal or a child's KeyboardInterrupt, raises inside this
    # at-fork hook, where CPython reports and drops it: as the race did before, for those.)
    mask = getattr(_FORK, "mask", None)
    if mask is not None:
        _FORK.mask = None
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _restore_handlers_in_child():
    # A process forked while the handlers are installed (a DataLoader worker, an evaluator's
    # multiprocessing pool worker, as panopticapi's) must not keep them: it answers a signal
    # as it would without them, so that e.g. Pool.terminate()'s SIGTERM ends it.
    try:
        for hook in reversed(_INSTALLED):
            for sig, handler in hook._old_handlers.items():
                try:
                    signal.signal(sig, handler)
                except (ValueError, OSError, TypeError):  # an old handler installed from C
                    pass  # (getsignal gave None): _on_signal's check answers for it
        _INSTALLED.clear()
    finally:  # never a child with its stop signals blocked for good
        _unblock_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_block_before_fork, after_in_parent=_unblock_after_fork,
                        after_in_child=_restore_handlers_in_child)


class PersistHook(HookBase):
    """
    Persists a training run into its output folder.

    - ``before_train``: checks that the config loads back and writes ``config.yaml`` (and
      ``persist.yaml``); refuses to start a new run over an earlier run's checkpoints.
    - ``after_step``: writes ``model_{iter:07d}.pth`` when ``(iter + 1) % CHECKPOINT_PERIOD == 0``,
      or once ``PERSIST.CHECKPOINT_MINUTES`` have passed on the main process's clock since the
      last save; and, after a ``PERSIST.STOP_SIGNALS`` signal (SIGINT, SIGTERM) on any process,
      a checkpoint of the finished iteration before every process stops.
    - ``after_train``: only if training completed, ``model_final.pth`` and the inference export
      (a stop signal received during EvalHook's final evaluation stops after
      ``model_final.pth``: ``--resume`` exports). Where an earlier hook's ``after_train``
      raises, its cleanup (writes, mirror, signal handlers, lock) still runs.
    - with ``PERSIST.BEST_METRIC``: after each evaluation that improves the metric,
      ``model_best.pth`` (the weights EvalHook just evaluated) and ``best.json``.
    - after each evaluation (EvalHook's, in its ``after_step`` and ``after_train``): its
      metrics in ``evaluations.json``; with ``PERSIST.EARLY_STOP_PATIENCE``, the decision to
      stop (main process, sent to all), after which every process stops after that iteration
      and ``after_train`` completes the run as at ``MAX_ITER`` (raising
      :class:`~d2persist.errors.EarlyStopped`, which PersistTrainer catches).
    - with ``PERSIST.EMA_DECAY`` or ``PERSIST.VAL_LOSS``: its companion
      :class:`~d2persist.training.before_eval.BeforeEvaluation`, placed right before
      ``EvalHook``, updates the EMA weights after every step and, for each evaluation, swaps
      them in (``EMA_EVAL``) and stores the validation loss; this hook's ``after_step`` and
      ``after_train`` give the model its own weights back first. The average travels in
      ``state_dict``; the export is of the weights evaluated.

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
    travels in the checkpoint through ``state_dict``/``load_state_dict``: register it before
    ``resume_or_load`` (a resume that left it unread is refused). A run resumed with
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
        self._checkpointer: Optional[PersistCheckpointer] = None
        self._kept: List[str] = []
        self._resume_states: Optional[List[Dict[str, Any]]] = None
        self._pending_resume: Optional[List[Dict[str, Any]]] = None
        self._rng_to_restore: Optional[dict] = None
        self._last_saved: Optional[int] = None
        # the last snapshot, once written: the next one's buffers
        self._spare: Optional[dict] = None
        self._signal: Optional[int] = None
        self._old_handlers: Dict[int, Any] = {}
        self._handler_pid = os.getpid()  # the process whose signals the handlers are for
        stops = self.options["STOP_SIGNALS"] if self.options["SAVE_ON_INTERRUPT"] else []
        self._stop_signals = [getattr(signal, name) for name in stops]
        minutes = self.options["CHECKPOINT_MINUTES"]
        self._save_every = minutes * 60 if minutes > 0 else None  # seconds
        # monotonic time of the last save (or of the start)
        self._last_save_time: Optional[float] = None
        metric = self.options["BEST_METRIC"]
        self._best = BestMetric(metric, self.options["BEST_MODE"]) if metric else None
        patience = self.options["EARLY_STOP_PATIENCE"]
        self._early = EarlyStopping(metric, self.options["BEST_MODE"], patience,
                                    self.options["EARLY_STOP_MIN_DELTA"]) if patience else None
        # the last iteration trained, once early stopping ended the run
        self._stopped_at: Optional[int] = None
        # whether EvalHook evaluates when training completes (its eval_after_train)
        self._eval_at_end = True
        # the trainer's checkpointers' other checkpointables (set at before_train)
        self._extra_checkpointables: Dict[str, Any] = {}
        # whether before_train ran (a trainer trains once), a second one was refused, and
        # after_train was called
        self._began = False
        self._refused_again = False
        self._after_train_called = False
        # whether the trainer's resume gave this hook its state (load_state_dict)
        self._restored = False
        # every evaluation's metrics (evaluations.json), on the main process
        self._evaluations = EvaluationLog()
        # what training itself puts into the event storage
        self._training_keys: Optional[Set[str]] = None
        # the value of BEST_METRIC of the evaluation just considered (main process)
        self._last_value: Optional[float] = None
        # the mirror's uploads, on the main process (PERSIST.MIRROR)
        self._mirror_jobs: Optional[RunMirror] = None
        # training.png's drawing, on the main process (PERSIST.PLOT)
        self._plotter: Optional[BackgroundPlot] = None
        decay = self.options["EMA_DECAY"]
        self._ema = ModelEMA(decay, self.options["EMA_WARMUP"]) if decay > 0 else None
        self._ema_eval = self._ema is not None and self.options["EMA_EVAL"]
        # what must run before EvalHook: EMA update and swap, validation loss
        self._before_eval = (
            BeforeEvaluation(self.run, self._ema, self._evaluated_after)
            if self._ema is not None or self.options["VAL_LOSS"] else None)
        # EvalHook's period, once it is found in the trainer's hooks (else the config's)
        self._eval_period = self.run.eval_period

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
        # d2persist's names that are hard links to a checkpoint: a write there changes it too
        linked = [FINAL_NAME] + ([BEST_NAME] if self._best is not None else [])
        clashing = sorted({f"{getattr(h, '_file_prefix', '')}.pth" for h in others
                           if isinstance(h, BestCheckpointer)} & set(linked))
        if comm.get_world_size() > 1:  # (added on the main process alone, as usual)
            clashing = sorted({n for names in comm.all_gather(clashing) for n in names})
        if clashing:
            raise D2PersistError(
                f"detectron2's BestCheckpointer writes {clashing[0]}, which d2persist makes a "
                "hard link to a checkpoint (its write would change that checkpoint too): "
                "remove it; PERSIST.BEST_METRIC keeps the best model.")
        kept = [h for h in others if not isinstance(h, (PeriodicCheckpointer, BeforeEvaluation))]
        removed = [h for h in others if isinstance(h, PeriodicCheckpointer)]
        if removed:
            logger.info("PersistHook writes the checkpoints: PeriodicCheckpointer removed.")
        # what the trainer's checkpointers save besides the model and the trainer (an EMA, a
        # project's own state: add_checkpointable), saved by this hook's too
        self._extra_checkpointables = {}
        for c in [getattr(self.trainer, "checkpointer", None)] + [
                getattr(h, "checkpointer", None) for h in removed]:
            for k, v in (getattr(c, "checkpointables", None) or {}).items():
                if k != "trainer":
                    self._extra_checkpointables.setdefault(k, v)
        at = next((i for i, h in enumerate(kept) if isinstance(h, EvalHook)), None)
        if at is not None:  # when EvalHook evaluates: as it says, not as the config does
            evaluator = kept[at]
            self._eval_period = int(getattr(evaluator, "_period", self.run.eval_period))
            self._eval_at_end = bool(getattr(evaluator, "_eval_after_train", True))
        if self._before_eval is not None:  # right before EvalHook, else before this hook
            self._before_eval.trainer = self.trainer
            self._before_eval.eval_after_train = self._eval_at_end
            kept.insert(len(kept) if at is None else at, self._before_eval)
        self.trainer._hooks = kept + [self]
        self._guard_after_train()

    def _guard_after_train(self):
        """
        The trainer's ``after_train`` calls each hook's in turn, with no ``finally``: where an
        earlier hook's raises (EvalHook's final evaluation failing, a second Ctrl-C there),
        this hook's is never called. Its cleanup then runs here: the last writes waited for,
        the mirror's last uploads, the signal handlers, the run lock.
        """
        bound = self.trainer.after_train
        func = getattr(bound, "__func__", None)
        trainer = self.trainer  # the proxy: the trainer does not hold itself through this
        original = (lambda: func(trainer)) if func is not None else bound

        def after_train():
            if self._refused_again:  # a second train(): every hook ended with the first
                return
            try:
                original()
            finally:
                if not self._after_train_called:
                    self._clean_up_skipped()

        self.trainer.after_train = after_train

    def _clean_up_skipped(self):
        logger.warning("PersistHook's after_train was not reached (an earlier hook's raised): "
                       "no model_final or export; the last checkpoint written stands.")
        self._restore_signal_handlers()
        try:
            self._writer.wait()
        except Exception:  # (the error in flight is the earlier hook's)
            logger.exception("The last checkpoint write failed:")
        finally:
            self._finish()

    # -- before_train --------------------------------------------------------------------------

    def before_train(self) -> None:
        if self._began:  # (its iterations would be trained again over its checkpoints)
            self._refused_again = True  # (no after_train of any hook then: see the guard)
            raise D2PersistError(
                "This trainer has trained already (train() called again): build a new trainer "
                "and call resume_or_load(resume=True) on it to continue the run.")
        self._began = True
        self._take_place()
        out = self.run.output_dir
        self.run.check()  # raises ConfigRoundTripError, on every process alike
        # (PersistTrainer and train_lazy checked before training; with a stock trainer it is
        # refused here, and detectron2's finally still runs EvalHook's last evaluation)
        check_resume_point(self.run, self.trainer.start_iter, self.trainer.max_iter)
        if self.trainer.start_iter > 0 and not self._restored:  # (the same on every process;
            main_decides(self._check_registered_before_resume)  # before anything is written)
        hold_run_lock(out)  # this process already holds it when PersistTrainer resumed

        def start_folder():  # the folder the main process writes is the one that counts
            self._mirror_jobs = start_run_folder(self.run, self.trainer.start_iter)

        # its refusals (and a failing write) reach every process, not the main one alone
        main_decides(start_folder, errors=(D2PersistError, OSError))
        if comm.is_main_process() and self.options["PLOT"]:
            self._plotter = BackgroundPlot(out, on_drawn=self._mirror)
        self._checkpointer = PersistCheckpointer(self.trainer.model, out, trainer=self.trainer,
                                                 **self._extra_checkpointables)
        self._apply_pending_resume()
        if self._ema is not None:
            self._ema.attach(self.trainer.model)
            if self.trainer.start_iter > 0 and not self._ema.restored:
                logger.warning("The checkpoint holds no EMA weights (it was written without "
                               "PERSIST.EMA_DECAY): the average starts from the resumed weights.")
        if self._before_eval is not None:
            self._before_eval.prepare()
        start = self.trainer.start_iter
        if start > 0 and comm.is_main_process():
            view = RunView(out, "run")
            if self._best is not None:
                self._best.adopt(view.best_record())
            records = view.evaluation_records()
            self._evaluations.start(records, before=start)
            if self._early is not None:  # what was evaluated after the checkpoint was written
                self._early.merge(records, before=start)
        if self._best is not None and start > 0:  # its errors reach every process
            main_decides(self._name_best, errors=(D2PersistError, OSError))
        self._install_signal_handlers()
        self._last_save_time = time.monotonic()
        if self._early is not None and start > 0 and main_says(self._early.should_stop()):
            self._stopped_at = start - 1  # the first before_step ends the loop: every other
            # hook still gets its before_train
            logger.info("This run stopped early after iteration %d (PERSIST.EARLY_STOP_PATIENCE "
                        "%d): nothing left to train.", self._stopped_at, self._early.patience)

    def _check_registered_before_resume(self):
        """
        Refuse a resume that left this hook's saved state unread: it was registered after
        ``resume_or_load`` (detectron2 only logs that it found no hook to give the state to).
        A checkpoint of a stock run holds none: that run continues (main process).
        """
        import torch

        name = RunView(self.run.output_dir, "run").last_checkpoint()
        path = os.path.join(self.run.output_dir, name) if name else ""
        if not name or not os.path.isfile(path):
            return
        try:  # (mmap: the tensors are not read)
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 (cannot tell: the resume went through it already)
            return
        hooks = (data.get("trainer") or {}).get("hooks") or {} if isinstance(data, dict) else {}
        if type(self).__qualname__ in hooks:
            raise D2PersistError(
                f"PersistHook was registered after resume_or_load: the state it saved in {path} "
                "(random number generators, EMA, retention, best model) was not restored; "
                "register it before calling resume_or_load(resume=True).")

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
        self._handler_pid = os.getpid()
        for sig in self._stop_signals:
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        _INSTALLED.append(self)

    def _restore_signal_handlers(self):
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}
        if self in _INSTALLED:
            _INSTALLED.remove(self)

    def _on_signal(self, signum, frame):
        if os.getpid() != self._handler_pid:
            # a forked process that still has this handler (restored at fork where it can be,
            # _restore_handlers_in_child): it answers as it would without it
            old = self._old_handlers.get(signum)
            old = signal.SIG_DFL if old is None else old
            signal.signal(signum, old)
            if callable(old):
                old(signum, frame)
            elif old != signal.SIG_IGN:
                os.kill(os.getpid(), signum)
            return
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

    def before_step(self) -> None:
        if self._stopped_at is not None:  # a resumed run that early stopping had ended
            raise EarlyStopped(self._stopped_at)
        # Hooks after this one (evaluation, writers) may draw random numbers after a save; undo
        # that, so training continues from exactly the RNG state the checkpoint holds.
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def after_step(self) -> None:
        if self._ema is not None:  # the model's own weights back after an EMA evaluation
            self._ema.swap_out()
        self._writer.check()
        it = self.trainer.iter
        period = self.run.checkpoint_period
        sig, timed = self._agree()
        evaluated = self._evaluated_after(it)
        if not evaluated and comm.is_main_process():  # what training itself stores
            latest = self.trainer.storage.latest()
            self._training_keys = (self._training_keys or set()) | {
                k for k, (_, i) in latest.items() if i == it}
        periodic = period > 0 and (it + 1) % period == 0
        # the best is decided first, so that a checkpoint of this iteration knows it
        try:  # (on the main process, which every process hears: the same error everywhere)
            improved = self._best is not None and evaluated and main_decides(
                lambda: self._consider_best(it))
        except ConfigError:  # PERSIST.BEST_METRIC no evaluation gives: this iteration's
            if periodic or timed or sig:  # checkpoint first, so that the fixed name resumes
                self._save(checkpoint_name(it), it)
                self._writer.wait()
            raise
        if evaluated:
            self._record_evaluation(it, it)
        stop = self._early is not None and evaluated and self._early_stop_decided(it)
        if timed and not periodic and not sig:
            logger.info("%s minutes since the last save: checkpoint after iteration %d "
                        "(PERSIST.CHECKPOINT_MINUTES).", self.options["CHECKPOINT_MINUTES"], it)
        if periodic or timed or sig:  # with a new best, model_best.pth is named first
            self._save(checkpoint_name(it), it, best=improved)
        elif improved:
            self._save_best(it)
        if evaluated and self._plotter is not None:
            self._plotter.request()
        if sig:
            self._writer.wait()
            logger.warning(
                "Stopped by %s after iteration %d; checkpoint %s saved. Resume with --resume.",
                signal.Signals(sig).name, it, checkpoint_name(it),
            )
            raise _stop_exception(sig)
        if stop and self._early is not None:
            self._stopped_at = it
            status = self._early.status()
            logger.info(
                "Early stopping after iteration %d: %s has not improved by more than %s for %d "
                "evaluations (best %s after iteration %s; PERSIST.EARLY_STOP_PATIENCE %d). "
                "Completing the run.", it, self._early.metric, self._early.min_delta,
                status["without_improvement"], status["best"], status["best_iteration"],
                self._early.patience)
            raise EarlyStopped(it)

    # -- best ----------------------------------------------------------------------------------

    def _evaluated_after(self, it):
        """Whether EvalHook evaluated after iteration ``it`` (in its after_step)."""
        period = self._eval_period
        return period > 0 and (it + 1) % period == 0 and it + 1 != self.trainer.max_iter

    def _consider_best(self, it, final=False):
        """
        On the main process (the one evaluation results reach), after an evaluation: whether
        it improved the best so far, which is then updated.
        """
        if not comm.is_main_process():
            return False
        latest = self.trainer.storage.latest()
        self._last_value = None
        if not final and not self._evaluated_after(it):
            return False
        # after_train's evaluation is stored under the storage's iteration then (max_iter)
        at = self.trainer.storage.iter if final else it
        value = evaluation_value(latest, self._best.metric, at, self._training_keys or ())
        self._last_value = value
        if value is None or not self._best.improves(value):
            return False
        self._best.update(value, it)
        logger.info("New best %s = %s after iteration %d: writing %s.",
                    self._best.metric, value, it, BEST_NAME)
        return True

    def _record_evaluation(self, iteration, at):
        """
        On the main process: the metrics EvalHook just stored under ``at`` (the weights of
        ``iteration``) into ``evaluations.json``, written in the background.
        """
        if not comm.is_main_process():
            return
        latest = self.trainer.storage.latest()
        known = self._training_keys
        # EvalHook stores flattened results ("bbox/AP"); training's own keys with a "/"
        # ("fast_rcnn/cls_accuracy") are learnt from the iterations without an evaluation
        if known is None:  # none yet on this side of a resume: by name
            metrics = {k: v for k, (v, i) in latest.items()
                       if i == at and "/" in k and k.split("/", 1)[0] in EVAL_TASKS}
        else:
            metrics = {k: v for k, (v, i) in latest.items()
                       if i == at and "/" in k and k not in known}
        if not metrics:
            return
        self._evaluations.add(iteration, metrics)
        self._write_evaluations()

    def _write_evaluations(self):
        early = None if self._early is None else self._early.record(self._stopped_at)
        data = self._evaluations.to_json(early)
        self._writer.submit(self._write_evaluations_now, data)

    def _write_evaluations_now(self, data):
        write_json(os.path.join(self.run.output_dir, EVALUATIONS_NAME), data)
        self._mirror(EVALUATIONS_NAME)

    def _early_stop_decided(self, it):
        """
        Whether to stop after iteration ``it`` (an evaluation's): decided on the main process
        (which has the evaluation's results), the same answer on every process.
        """
        stop = False
        if comm.is_main_process() and self._early is not None:
            if self._last_value is not None:
                self._early.add(it, self._last_value)
            stop = self._early.should_stop()
        return main_says(stop)

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

    def _name_best(self):
        """
        On resume (main process): ``model_best.pth`` and ``best.json`` as the best the run
        resumes with says, where a kill left them behind it. A checkpoint recording a new best
        is tagged in ``last_checkpoint`` only once they are written; but with no tag yet (the
        run's first checkpoints) the resume takes the newest checkpoint, written before them.
        """
        assert self._best is not None
        it, out = self._best.iteration, self.run.output_dir
        if it is None or not os.path.isfile(os.path.join(out, checkpoint_name(it))):
            return  # none, or a snapshot of its own (no checkpoint of that iteration)
        saved, best = (os.path.join(out, n) for n in (checkpoint_name(it), BEST_NAME))
        if not os.path.isfile(best) or checkpoint_sha256(best) != checkpoint_sha256(saved):
            logger.info("%s is not the checkpoint of the best evaluation (after iteration %d; "
                        "the run was stopped before it named it): naming it now.", BEST_NAME, it)
            self._link_best(checkpoint_name(it), self._best.record())
            return
        record = RunView(out, "run").best_record() or {}
        if (record.get("iteration"), record.get("value")) != (it, self._best.value):
            write_json(os.path.join(out, BEST_RECORD), self._best.record())
            self._mirror(BEST_RECORD)

    def _link_best(self, saved, record, mirror=True):
        """``model_best.pth`` as a second name of the checkpoint ``saved``, then best.json."""
        self._checkpointer.link(saved, BEST_NAME, tag=False)
        write_json(os.path.join(self.run.output_dir, BEST_RECORD), record)
        if mirror:
            self._mirror(BEST_NAME, BEST_NAME + SIDECAR_SUFFIX, BEST_RECORD)

    # -- the mirror ----------------------------------------------------------------------------

    def _mirror(self, *names, folder=None, remove=(), tag=None, retire=(), remove_first=()):
        """Queue one upload job to the mirror (see :meth:`RunMirror.upload`), if there is one."""
        if self._mirror_jobs is not None:
            self._mirror_jobs.upload(*names, folder=folder, remove=remove, tag=tag, retire=retire,
                                     remove_first=remove_first)

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
        self._writer.wait()  # (the write in flight prunes _kept in its thread)
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
        retired = self._prune()
        # the checkpoint and its sha256 before anything names it; the retired ones removed
        # from the mirror after it is named there
        self._mirror(basename, basename + SIDECAR_SUFFIX, *best, tag=basename,
                     retire=[n for name in retired for n in (name, name + SIDECAR_SUFFIX)])
        if self._mirror_jobs is not None:  # a job of its own: the mirror's ls and plot read it
            self._mirror_jobs.upload_metrics()

    def _prune(self) -> List[str]:
        """Remove the checkpoints beyond PERSIST.MAX_TO_KEEP here; returns their names."""
        keep = int(self.options["MAX_TO_KEEP"])
        if keep <= 0 or len(self._kept) <= keep:
            return []
        old, self._kept = self._kept[:-keep], self._kept[-keep:]
        retired = [name for name in old if name != FINAL_NAME]
        assert self._checkpointer is not None  # (set in before_train)
        for name in retired:
            self._checkpointer.remove(name)
        return retired

    # -- after_train ---------------------------------------------------------------------------

    def after_train(self) -> None:
        # the trainer calls after_train in the ``finally`` of its loop: an exception ending
        # training is still in flight here
        failure = sys.exc_info()[1]
        self._after_train_called = True
        try:
            self._after_train()
        finally:
            self._finish()
        if isinstance(failure, FloatingPointError) and not isinstance(
            failure, TrainingDivergedError
        ):
            raise diverged_error(self.run, self.trainer.iter, failure) from failure

    def _finish(self):
        """What ends every run, completed or not: the plot, the mirror's uploads, the lock."""
        self._spare = None  # the snapshot buffers: training is over
        try:
            if self._plotter is not None:
                self._plotter.finish()
        except Exception:  # a picture never hides why training ended
            logger.exception("Could not draw %s:", TRAINING_PLOT)
        try:
            if self._mirror_jobs is not None:  # also after a failure or a signal
                self._mirror_jobs.finish()
        finally:
            if comm.is_main_process():
                unlock_run_folder(self.run.output_dir)

    def _after_train(self):
        self._restore_signal_handlers()
        if self._ema is not None:  # the final checkpoint holds the model's own weights
            self._ema.swap_out()
        trainer = self.trainer
        stopped = self._stopped_at is not None  # early stopping completed the run
        completed = trainer.iter >= trainer.max_iter or stopped
        try:
            self._writer.wait()
        except Exception:
            if completed:
                raise
            logger.exception("The last checkpoint write failed:")
            return
        if not completed or self._checkpointer is None:
            return  # failed or interrupted: no model_final, no export
        last = self._stopped_at if stopped else trainer.max_iter - 1
        trained = trainer.start_iter <= last
        if self._last_saved == last or not trained and main_decides(
                lambda: self._final_behind(last), errors=(D2PersistError, OSError)):
            if comm.is_main_process():
                self._checkpointer.link(checkpoint_name(last), FINAL_NAME)
                self._mirror(FINAL_NAME, FINAL_NAME + SIDECAR_SUFFIX, tag=FINAL_NAME)
        elif trained or not main_says(RunView(self.run.output_dir, "run").has(FINAL_NAME)):
            self._save(FINAL_NAME, last)
            self._writer.wait()
        # EvalHook's final evaluation ran before this hook's after_train (also when a resumed
        # run had nothing left to train: then it re-evaluates the last checkpoint's weights);
        # none after an early stop (it stopped right after evaluating those weights)
        if not stopped:
            self._record_evaluation(last, trainer.storage.iter)
            if comm.is_main_process():
                self._writer.wait()  # before the last picture and upload read it
        # (an EvalHook told not to evaluate after training: no final evaluation to compare)
        if not stopped and self._eval_at_end and self._best is not None and main_decides(
                lambda: self._consider_best(last, final=True)):
            if comm.is_main_process():
                self._writer.submit(self._link_best, FINAL_NAME, self._best.record())
                self._writer.wait()
        if self._early is not None and comm.is_main_process():
            if not stopped and self._eval_at_end and self._last_value is not None:
                self._early.add(last, self._last_value)
            self._write_evaluations()  # with where it stopped
            self._writer.wait()
        sig, _ = self._agree()  # a stop signal during EvalHook's final evaluation (its
        if sig:  # handler was still this hook's): the export (minutes) is left to the resume
            logger.warning("Stopping on %s after the final checkpoint; the export is left to "
                           "--resume.", signal.Signals(sig).name)
            raise _stop_exception(sig)
        if self.options["EXPORT"]:
            if self._ema_eval:  # the weights the run evaluated
                assert self._ema is not None
                with self._ema.applied():
                    self._export(last, trained)
            else:
                self._export(last, trained)
        comm.synchronize()

    def _export(self, last, trained):
        """Export the weights of iteration ``last`` (or the best); the export evaluates itself."""
        manifest, behind = None, None
        main = comm.is_main_process()
        calibration = calibration_images(self.run) if main else []  # read once, for both
        folder = os.path.relpath(self.run.export_dir, self.run.output_dir)
        stale = trained or not main_decides(lambda: self._export_is_current(last),
                                            errors=(D2PersistError, OSError))
        if main and stale:
            ema = None
            if self._ema_eval:
                assert self._ema is not None
                ema = {"decay": self._ema.decay, "warmup": self._ema.warmup,
                       "updates": self._ema.updates}
            manifest = export_run(self.run, self._checkpointer.model, last, self._best,
                                  calibration, ema=ema)
        elif main:  # exported before: a run resumed once finished
            behind = self._export_behind_at_mirror(folder)
        if self.options["EXPORT_EVAL"] and main_says(manifest is not None):
            manifest = evaluate_run_export(self.run, self.trainer, self._checkpointer.model,
                                           manifest, calibration)  # collective
        upload = manifest if manifest is not None else behind
        if upload is not None:
            # the mirror's bundle stops being complete before any of its files is replaced (a
            # reader there never takes new files for the old manifest's); its manifest last;
            # one job: a removal that fails uploads nothing under the old manifest
            self._mirror(*upload["files"], MANIFEST_NAME, folder=folder,
                         remove_first=[MANIFEST_NAME])

    def _final_behind(self, last: int) -> bool:
        """
        Whether the checkpoint of iteration ``last`` is there and ``model_final.pth`` is not it,
        in a run resumed with nothing left to train (main process): it may be an earlier
        MAX_ITER's, from a run extended and killed after its last checkpoint, before it named
        that one final; or none, killed the same way on its first MAX_ITER.
        """
        path = os.path.join(self.run.output_dir, checkpoint_name(last))
        if not os.path.isfile(path):  # resumed from model_final itself
            return False
        final = os.path.join(self.run.output_dir, FINAL_NAME)
        return not os.path.isfile(final) or checkpoint_sha256(final) != checkpoint_sha256(path)

    def _export_is_current(self, last: int) -> bool:
        """
        Whether the export holds what :func:`export_run` would write now, whole: the weights of
        iteration ``last`` (or of the best), and with ``PERSIST.EXPORT_EVAL`` its evaluation. In
        a run resumed with nothing left to train it may not: an earlier MAX_ITER's export (the
        run extended and killed before it exported), or one killed during its evaluation
        (without ``evaluation``, perhaps without the INT8 model it was remaking).
        """
        try:
            manifest = read_manifest(self.run.export_dir, verify=False)
        except D2PersistError:  # none, or damaged: exported again
            return False
        wanted = exported_weights(self.run, last, self._best)
        if (manifest.get("iteration"), (manifest.get("source") or {}).get("from")) != wanted:
            logger.info("The export holds iteration %s, not %s: exporting again.",
                        manifest.get("iteration"), wanted[0])
            return False
        name = self.run.test_dataset_name()
        if (self.options["EXPORT_EVAL"] and name and "evaluation" not in manifest
                and self.run.build_evaluator(self.trainer, name) is not None):
            logger.info("The export was never evaluated (the run was stopped during its "
                        "evaluation): exporting and evaluating it again.")
            return False
        return True

    def _export_behind_at_mirror(self, folder: str) -> Optional[dict]:
        """
        The run's export (its manifest), where the mirror does not hold it as it is here: a
        run killed after it exported, before the mirror had the bundle whole, then resumed
        once finished; else None.
        """
        if self._mirror_jobs is None:
            return None
        try:
            manifest = read_manifest(self.run.export_dir, verify=False)
            with open(os.path.join(self.run.export_dir, MANIFEST_NAME), "rb") as f:
                local = f.read().decode("utf-8")
        except (D2PersistError, OSError, UnicodeDecodeError):  # damaged here: verify says so
            return None
        try:
            there = self._mirror_jobs.uploader.mirror.read_text(f"{folder}/{MANIFEST_NAME}")
        except Exception:  # noqa: BLE001 (cannot tell: uploaded again; failures are reported)
            there = None
        return None if there == local else manifest

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        state: Dict[str, Any] = {"kept": list(self._kept), "resume": self._resume_states}
        if self._best is not None:
            state["best"] = self._best.state_dict()
        if self._early is not None:
            state["early_stop"] = self._early.state_dict()
        # every evaluation so far (main process): a resume elsewhere (from the mirror) has it
        state["evaluations"] = list(self._evaluations.records)
        if self._ema is not None:
            state[EMA_STATE_KEY] = dict(self._ema.state_dict(), evaluated=self._ema_eval)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = True
        self._kept = list(state_dict.get("kept", []))
        self._pending_resume = state_dict.get("resume")
        if self._best is not None:
            self._best.load_state_dict(state_dict.get("best") or {})
        if self._early is not None:
            self._early.load_state_dict(state_dict.get("early_stop") or {})
        self._evaluations.records = list(state_dict.get("evaluations") or [])
        if self._ema is not None and state_dict.get(EMA_STATE_KEY):
            self._ema.load_state_dict(state_dict[EMA_STATE_KEY])
