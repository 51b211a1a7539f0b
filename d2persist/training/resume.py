"""
The one decision of what a run resumes from, and its collectives.

Every entry point (PersistTrainer, the LazyConfig loop, a stock trainer with PersistHook), every
torchrun restart and every world size calls :func:`resume_or_load`: the main process takes the
run lock, decides (newest checkpoint that verifies, else the mirror's, else the weights given),
and every process loads the bytes it sends.
"""

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any, Dict, Set

from detectron2.utils import comm

from ..artifacts.checkpoints import checkpoint_sha256, verify_checkpoint
from ..artifacts.view import RunView, find_newest_valid, list_checkpoints, open_view
from ..collective import main_decides, main_says
from ..errors import (
    ArtifactError,
    ConfigError,
    D2PersistError,
    OutputDirNotEmptyError,
    UnsafeArtifactError,
)
from ..files.atomic import sha256_file, write_text
from ..files.lock import lock_run_folder, unlock_run_folder
from ..files.mirror import check_mirror
from ..layout import BEST_NAME, BEST_RECORD, LAST_CHECKPOINT, MANIFEST_NAME, SIDECAR_SUFFIX

if TYPE_CHECKING:
    from fvcore.common.checkpoint import Checkpointer

    from ..runconfig import RunConfig

__all__ = ["hold_run_lock", "choose_checkpoint", "resume_or_load", "check_output_dir",
           "check_resume_point"]

logger = logging.getLogger(__name__)


def hold_run_lock(folder: str) -> bool:
    """
    The main process takes the run lock of ``folder``
    (:func:`~d2persist.files.lock.lock_run_folder`) before it writes anything there; collective
    when distributed, so every process raises the same one-sentence error when another run
    holds it. Entry points that train call it first (the tools' setup, ``resume_or_load``,
    PersistHook's ``before_train``); readers (prediction, evaluation, export from a run) never do.

    Returns:
        bool: whether this call took the lock (on the main process; False elsewhere).

    Raises:
        RunFolderBusyError: another process writes ``folder``.
        ArtifactError: the lock file cannot be created.
    """
    took = main_decides(lambda: bool(folder) and lock_run_folder(folder))
    return bool(took) and comm.is_main_process()


def _fetch_from_mirror(url, folder):
    """
    Into a folder without checkpoints: the mirror's newest checkpoint that verifies (its
    ``last_checkpoint`` target first, as the run view orders them), with its sha256 sidecar,
    and the best model with its record if the mirror has them. Returns its path or None.
    """
    try:
        view = open_view(url)
        names = set(view.names())
        candidates = view.resume_candidates()
    except ArtifactError:  # the store does not answer: never start afresh over a run
        raise
    except D2PersistError:
        return None  # nothing there yet (a mirror no run has written to)
    except Exception as e:  # fsspec backends raise many kinds
        raise ArtifactError(f"Cannot read the mirror {url} ({type(e).__name__}: {e}).") from None
    os.makedirs(folder, exist_ok=True)
    for name in candidates:
        if _download_checkpoint(view, names, name, folder, url):
            if BEST_NAME in names:
                _fetch_best(view, names, folder, url)
            write_text(os.path.join(folder, LAST_CHECKPOINT), name)
            logger.info("Resuming from the mirror %s: downloaded %s.", url, name)
            return os.path.join(folder, name)
    # never start afresh over a run the mirror holds (as over a local one, see _decide)
    if candidates:
        raise ArtifactError(
            f"Cannot resume: no checkpoint at the mirror {url} verifies "
            f"({', '.join(candidates[:3])}, see the warnings above); restore a good copy there, "
            "or set another PERSIST.MIRROR to start a new run.")
    tagged = view.last_checkpoint()
    if tagged:
        raise ArtifactError(
            f"Cannot resume: the mirror's {LAST_CHECKPOINT} ({url}) names {tagged}, which is "
            f"not there (and no other checkpoint is); restore it, or remove {LAST_CHECKPOINT} "
            "there to start a new run.")
    return None


def _fetch_best(view: Any, names: Set[str], folder: str, url: str) -> None:
    """
    The mirror's best model and its record, after it (as the run writes them): a run recording
    one exports it (PERSIST.EXPORT_FROM "best") and keeps it while it scores best. Not needed to
    resume: where it cannot be had, the run resumes without it, with a warning.
    """
    try:
        if _download_checkpoint(view, names, BEST_NAME, folder, url):
            if BEST_RECORD in names:  # (else the resume writes it, from the checkpoint's best)
                _download(view, BEST_RECORD, folder, url)
            return
    except UnsafeArtifactError:
        raise  # a hostile file is refused loudly, as the checkpoint would be
    except D2PersistError as e:
        logger.warning("%s", e)
    logger.warning("The run resumes without the mirror's %s: its next best evaluation writes "
                   "it (an export of the best needs it before then).", BEST_NAME)
    for n in (BEST_NAME, BEST_NAME + SIDECAR_SUFFIX, BEST_RECORD):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, n))


def _download(view: Any, name: str, folder: str, url: str) -> None:
    """Download the mirror's file ``name`` into ``folder``, or raise one sentence."""
    try:
        view.download(name, os.path.join(folder, name))
    except Exception as e:
        raise ArtifactError(f"Cannot download {name} from the mirror {url} "
                            f"({type(e).__name__}: {e}).") from None


def _download_checkpoint(view: Any, names: Set[str], name: str, folder: str, url: str) -> bool:
    """Download the mirror's checkpoint ``name`` and its sidecar; whether it verifies."""
    for n in (name, name + SIDECAR_SUFFIX):
        if n in names:
            _download(view, n, folder, url)
    problem = verify_checkpoint(os.path.join(folder, name))
    if problem is None:
        return True
    logger.warning("Checkpoint %s of the mirror %s is not usable (%s).", name, url, problem)
    for n in (name, name + SIDECAR_SUFFIX):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, n))
    return False


def _decide(folder, resume, refuse_existing, mirror=""):
    """The main process's choice: a checkpoint's path or "" (raises the user's errors)."""
    _check_not_bundle(folder)
    if mirror:
        check_mirror(mirror, folder)
    if resume and mirror and not list_checkpoints(folder):
        _fetch_from_mirror(mirror, folder)
    if not resume:
        if refuse_existing:
            check_output_dir(folder, 0)
        return ""
    path = find_newest_valid(folder)
    if path:
        return path
    existing = list_checkpoints(folder)
    if existing:
        raise ArtifactError(
            f"Cannot resume: no checkpoint in {folder} verifies ({', '.join(existing[:3])} "
            "are truncated or corrupt, see the warnings above); restore a good copy, or move "
            "them away to start a new run."
        )
    tagged = RunView(folder, "run").last_checkpoint() if os.path.isdir(folder) else None
    if tagged:
        raise ArtifactError(
            f"Cannot resume: {folder}/{LAST_CHECKPOINT} names {tagged}, which is not there "
            f"(and no other checkpoint is); restore it, or remove {LAST_CHECKPOINT} to start "
            "a new run.")
    logger.info("No checkpoint to resume from in %s: starting a new run.", folder)
    return ""


def choose_checkpoint(folder: str, resume: bool, refuse_existing: bool = True,
                      mirror: str = "") -> str:
    """
    The one decision of what a run starts from. Collective when distributed: the main process
    verifies and decides, every process gets its answer (and raises the same error).

    Args:
        folder (str): the run's output folder.
        resume (bool): continue from the newest checkpoint that verifies.
        refuse_existing (bool): without ``resume``, refuse a folder that holds checkpoints (a
            new training run would overwrite them).
        mirror (str): PERSIST.MIRROR: with ``resume`` and no checkpoint in ``folder`` (a lost
            machine), the mirror's newest checkpoint that verifies is downloaded first.

    Returns:
        str: the checkpoint to load, or "" to start from the initial weights.

    Raises:
        ArtifactError: ``resume`` and the folder holds checkpoints, none of which verifies.
        OutputDirNotEmptyError: a new run in a folder that holds checkpoints.
    """
    # e.g. a hostile checkpoint: every process raises the main process's error
    return main_decides(lambda: _decide(folder, resume, refuse_existing, mirror))


@contextlib.contextmanager
def _local_copy(folder, path):
    """
    The main process's chosen checkpoint ``path`` as a file this process can read. Collective.

    A process whose own ``folder`` holds the same file (same sha256) reads it there: the
    common case, one machine or a shared file system. Otherwise (machines with their own
    disks) the main process sends the file's bytes over the process group, and this process
    reads them from a temporary file. A folder whose newest checkpoint is another one is not
    trusted: the main process's choice wins, with a warning.
    """
    import tempfile

    import torch.distributed as dist

    name = os.path.basename(path)
    # the main process verified its file against the sidecar a moment ago: no second hash
    main_digest = checkpoint_sha256(path) if comm.is_main_process() else None
    digest = main_says(main_digest)
    local = os.path.join(folder, name)
    have = comm.is_main_process() or (os.path.isfile(local) and sha256_file(local) == digest)
    if not comm.is_main_process():
        newest = list_checkpoints(folder)
        if newest and newest[0] != name:
            logger.warning(
                "This machine's %s holds %s, the main process resumes from %s: using the main "
                "process's checkpoint.", folder, newest[0], name,
            )
    if all(comm.all_gather(have)):
        yield local
        return
    payload = [None]
    if comm.is_main_process():
        with open(path, "rb") as f:
            payload = [f.read()]
    dist.broadcast_object_list(payload, src=0)  # bytes only: unpickling them runs no code
    if have:
        yield local
        return
    logger.info("Received %s (%.1f MB) from the main process.", name, len(payload[0]) / 1e6)
    with tempfile.TemporaryDirectory(prefix="d2persist-received-") as tmp:
        received = os.path.join(tmp, name)
        with open(received, "wb") as f:
            f.write(payload[0])
        del payload
        yield received


def _load_chosen(checkpointer: "Checkpointer", path: str) -> Dict[str, Any]:
    """Load the chosen checkpoint on every process, wherever its bytes are (see _local_copy)."""
    if comm.get_world_size() == 1:
        return _load_same_model(checkpointer, path)
    with _local_copy(checkpointer.save_dir, path) as local:
        return _load_same_model(checkpointer, local, shown=path)


def _load_same_model(checkpointer: "Checkpointer", path: str, shown: str = "") -> Dict[str, Any]:
    """
    ``checkpointer.load(path)``, refused in one sentence where the checkpoint's weights do not
    fit the model (another config's: tensors of other shapes, missing or left over; fvcore
    would skip them, and training go on from a model half new, with an optimizer state of
    other shapes). Refused as soon as the model's weights are compared, before the
    optimizer's state is loaded.
    """
    own = vars(checkpointer).get("_load_model")  # (an instance's own, if it has one)
    load_model = checkpointer._load_model  # (fvcore's override point; detectron2's too)

    def checked(checkpoint):
        incompatible = load_model(checkpoint)
        shapes = list(getattr(incompatible, "incorrect_shapes", None) or [])
        missing = list(getattr(incompatible, "missing_keys", None) or [])
        extra = list(getattr(incompatible, "unexpected_keys", None) or [])
        if shapes:
            key, had, want = shapes[0]
            what = (f"{len(shapes)} tensor(s) of other shapes, e.g. {key}: "
                    f"{tuple(had)} there, {tuple(want)} in this model")
        elif missing:
            what = f"{len(missing)} tensor(s) of this model missing, e.g. {missing[0]}"
        elif extra:
            what = f"{len(extra)} tensor(s) this model does not have, e.g. {extra[0]}"
        else:
            return incompatible
        raise ConfigError(
            f"Cannot resume from {shown or path}: it holds another model's weights ({what}); "
            "resume with the config the run was trained with (its config.yaml), or start a "
            "new run in another output folder.")

    checkpointer._load_model = checked
    try:
        return checkpointer.load(path)
    finally:
        if own is not None:
            checkpointer._load_model = own
        else:
            del checkpointer._load_model


def check_resume_point(run: "RunConfig", start_iter: int, max_iter: int) -> None:
    """
    Refuse, before training starts, a resumed run already past the iterations asked for (its
    final checkpoint would hold later weights under an earlier iteration), releasing the run
    lock (no training follows to release it). Every process computes the same.

    Args:
        run (RunConfig): the run (for the config's name of the iterations).
        start_iter (int): the iteration training would start at.
        max_iter (int): the iterations asked for.

    Raises:
        ConfigError: ``start_iter > max_iter``.
    """
    if start_iter > max_iter:
        if comm.is_main_process():  # no training follows: the lock resume_or_load took goes
            unlock_run_folder(run.output_dir)
        key = run.MAX_ITER_KEY
        raise ConfigError(
            f"Cannot resume {run.output_dir}: its checkpoint is of iteration {start_iter - 1}, "
            f"past {key} {max_iter}; resume with {key} {start_iter} or more, or start a new "
            "run in another output folder.")


def resume_or_load(checkpointer: "Checkpointer", weights: str, *, resume: bool,
                   mirror: str = "") -> bool:
    """
    Load what a training run starts from, as :func:`choose_checkpoint` decides: the newest
    checkpoint that verifies (with the trainer's and hooks' state), or ``weights`` (model
    only). Every entry point that trains uses this. No shared file system is needed: a process
    whose folder lacks the main process's checkpoint receives its bytes over the process group.

    Args:
        checkpointer (Checkpointer): whose ``save_dir`` is the run's output folder.
        weights (str): the initial weights (``MODEL.WEIGHTS`` / ``train.init_checkpoint``).
        resume (bool): continue the run in ``save_dir``.

    Returns:
        bool: whether a checkpoint was resumed (the trainer's ``iter`` then holds its
        iteration; start at ``iter + 1``).
    """
    took = hold_run_lock(checkpointer.save_dir)  # a mirror download writes into the folder
    try:
        path = choose_checkpoint(checkpointer.save_dir, resume, mirror=mirror)
        if path:
            _load_chosen(checkpointer, path)
            return True
        checkpointer.load(weights, checkpointables=[])
        return False
    except BaseException:
        if took:  # refused or failed: the folder is not this process's after all
            unlock_run_folder(checkpointer.save_dir)
        raise


def _check_not_bundle(folder: str) -> None:
    if os.path.isfile(os.path.join(folder, MANIFEST_NAME)):
        raise OutputDirNotEmptyError(
            f"{folder} is an export bundle ({MANIFEST_NAME}): training there would overwrite "
            "its files; choose another output folder.")


def check_output_dir(output_dir: str, start_iter: int) -> None:
    """
    Refuse to start a new run (``start_iter == 0``) in a folder that holds checkpoints, and
    any run in an export bundle's folder.

    Raises:
        OutputDirNotEmptyError: naming what is there and how to resume it.
    """
    _check_not_bundle(output_dir)
    if start_iter != 0:
        return
    existing = list_checkpoints(output_dir)
    if existing or RunView(output_dir, "run").has(LAST_CHECKPOINT):
        raise OutputDirNotEmptyError(
            f"{output_dir} already holds checkpoints of an earlier run "
            f"({', '.join(existing[:3]) or LAST_CHECKPOINT}); resume it with --resume "
            "(resume_or_load(resume=True)) or choose another OUTPUT_DIR."
        )
