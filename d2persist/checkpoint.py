"""
Checkpoints that stock detectron2 can read: written atomically and hashed, verified and safely
loaded, and the one decision of what a run resumes from.

File names and contents are detectron2's (``model_{iter:07d}.pth``, ``model_final.pth``,
``last_checkpoint``; keys ``model``, ``trainer``, ``iteration``), so ``DetectionCheckpointer``
and ``DefaultTrainer.resume_or_load`` read them unchanged. Next to each checkpoint d2persist
writes lies a ``.sha256`` sidecar in ``sha256sum`` format, so ``sha256sum -c
model_0000099.pth.sha256`` checks it by hand too.
"""

import contextlib
import logging
import os
import pickle

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm

from .errors import ArtifactError, D2PersistError, OutputDirNotEmptyError, UnsafeArtifactError
from .fileio import (
    fsync_dir,
    lock_run_folder,
    safe_torch_load,
    sha256_file,
    torch_save,
    unlock_run_folder,
    write_text,
)
from .layout import LAST_CHECKPOINT, SIDECAR_SUFFIX, TEMP_PREFIX
from .runview import (
    find_newest_valid,
    list_checkpoints,
    open_view,
    read_sidecar,
    verify_checkpoint,
)

__all__ = [
    "PersistCheckpointer",
    "snapshot_state",
    "all_finite",
    "list_checkpoints",
    "read_sidecar",
    "verify_checkpoint",
    "find_newest_valid",
    "check_output_dir",
    "hold_run_lock",
    "choose_checkpoint",
    "resume_or_load",
]

logger = logging.getLogger(__name__)


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _finite(tensor):
    """Whether no element of ``tensor`` is NaN or Inf (a sum first: it allocates nothing)."""
    if tensor.device.type == "cpu" and tensor.dtype in _NUMPY_FLOATS:
        # numpy, single-threaded: on the writer thread, torch would start a second thread pool
        # that competes with training for the cores
        array = tensor.numpy()
        with np.errstate(over="ignore", invalid="ignore"):  # a sum may overflow: then look closer
            return bool(np.isfinite(array.sum()) or np.isfinite(array).all())
    return bool(torch.isfinite(tensor.sum()) or torch.isfinite(tensor).all())


def all_finite(state: dict) -> bool:
    """Whether no floating-point tensor of ``state`` (name -> tensor) holds NaN or Inf."""
    return all(_finite(v) for v in state.values() if v.is_floating_point())


def check_output_dir(output_dir: str, start_iter: int) -> None:
    """
    Refuse to start a new run (``start_iter == 0``) in a folder that holds checkpoints.

    Raises:
        OutputDirNotEmptyError: naming what is there and how to resume it.
    """
    if start_iter != 0:
        return
    existing = list_checkpoints(output_dir)
    if existing or os.path.isfile(os.path.join(output_dir, LAST_CHECKPOINT)):
        raise OutputDirNotEmptyError(
            f"{output_dir} already holds checkpoints of an earlier run "
            f"({', '.join(existing[:3]) or LAST_CHECKPOINT}); resume it with --resume "
            "(resume_or_load(resume=True)) or choose another OUTPUT_DIR."
        )


def hold_run_lock(folder: str) -> bool:
    """
    The main process takes the run lock of ``folder``
    (:func:`~d2persist.fileio.lock_run_folder`) before it writes anything there; collective
    when distributed, so every process raises the same one-sentence error when another run
    holds it. Entry points that train call it first (the tools' setup, ``resume_or_load``,
    PersistHook's ``before_train``); readers (prediction, evaluation, export from a run) never do.

    Returns:
        bool: whether this call took the lock (on the main process; False elsewhere).

    Raises:
        RunFolderBusyError: another process writes ``folder``.
        ArtifactError: the lock file cannot be created.
    """
    error, took = None, False
    if folder and comm.is_main_process():
        try:
            took = lock_run_folder(folder)
        except D2PersistError as e:
            error = e
    if comm.get_world_size() > 1:
        error = comm.all_gather(error)[0]
    if error is not None:
        raise error
    return took


def _fetch_from_mirror(url, folder):
    """
    Into a folder without checkpoints: the mirror's newest checkpoint that verifies (its
    ``last_checkpoint`` target first, as the run view orders them), with its sha256 sidecar.
    Returns its path or None.
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
        path = os.path.join(folder, name)
        try:
            for n in (name, name + SIDECAR_SUFFIX):
                if n in names:
                    view.download(n, os.path.join(folder, n))
        except Exception as e:
            raise ArtifactError(f"Cannot download {name} from the mirror {url} "
                                f"({type(e).__name__}: {e}).") from None
        problem = verify_checkpoint(path)
        if problem is None:
            write_text(os.path.join(folder, LAST_CHECKPOINT), name)
            logger.info("Resuming from the mirror %s: downloaded %s.", url, name)
            return path
        logger.warning("Checkpoint %s of the mirror %s is not usable (%s).", name, url, problem)
        for n in (name, name + SIDECAR_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, n))
    return None


def _decide(folder, resume, refuse_existing, mirror=""):
    """The main process's choice: (path or "", error or None)."""
    if resume and mirror and not list_checkpoints(folder):
        _fetch_from_mirror(mirror, folder)
    if not resume:
        if refuse_existing:
            try:
                check_output_dir(folder, 0)
            except OutputDirNotEmptyError as e:
                return "", e
        return "", None
    path = find_newest_valid(folder)
    if path:
        return path, None
    existing = list_checkpoints(folder)
    if existing:
        return "", ArtifactError(
            f"Cannot resume: no checkpoint in {folder} verifies ({', '.join(existing[:3])} "
            "are truncated or corrupt, see the warnings above); restore a good copy, or move "
            "them away to start a new run."
        )
    logger.info("No checkpoint to resume from in %s: starting a new run.", folder)
    return "", None


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
    decision = None
    if comm.is_main_process():
        try:
            decision = _decide(folder, resume, refuse_existing, mirror)
        except D2PersistError as e:  # e.g. a hostile checkpoint: every process raises it
            decision = ("", e)
    if comm.get_world_size() > 1:
        decision = comm.all_gather(decision)[0]
    path, error = decision
    if error is not None:
        raise error
    return path


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
    main_digest = (read_sidecar(path) or sha256_file(path)) if comm.is_main_process() else None
    digest = comm.all_gather(main_digest)[0]
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


def _load_chosen(checkpointer, path):
    """Load the chosen checkpoint on every process, wherever its bytes are (see _local_copy)."""
    if comm.get_world_size() == 1:
        return checkpointer.load(path)
    with _local_copy(checkpointer.save_dir, path) as local:
        return checkpointer.load(local)


def resume_or_load(checkpointer, weights: str, *, resume: bool, mirror: str = "") -> bool:
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


def _fits(buffer, tensor):
    """Whether ``buffer`` can take a copy of ``tensor`` in place, with the same layout."""
    return (
        isinstance(buffer, torch.Tensor)
        and buffer.device.type == "cpu"
        and buffer.dtype == tensor.dtype
        and buffer.shape == tensor.shape
        and buffer.stride() == tensor.stride()
    )


def _copy(obj, into=None):
    """
    A copy of ``obj`` in CPU memory that shares none with it; tensors of ``into`` (an earlier
    copy of the same structure) are overwritten where they fit, so no memory is allocated.
    """
    if isinstance(obj, torch.Tensor):
        obj = obj.detach()
        if obj.layout is not torch.strided:
            return obj.clone()
        if _fits(into, obj):
            return into.copy_(obj)
        return torch.empty_like(obj, device="cpu", pin_memory=obj.is_cuda).copy_(obj)
    if isinstance(obj, dict):
        into = into if isinstance(into, dict) else {}
        return type(obj)((k, _copy(v, into.get(k))) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        if not (isinstance(into, (list, tuple)) and len(into) == len(obj)):
            into = [None] * len(obj)
        items = [_copy(v, b) for v, b in zip(obj, into)]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # namedtuple
    return obj


def snapshot_state(checkpointer, copy, into=None, **extra):
    """
    The dict a checkpoint holds: ``model``, each checkpointable's state, and ``extra``.

    Args:
        checkpointer (fvcore Checkpointer): gives the model and checkpointables.
        copy (bool): copy tensors to CPU memory, so training can go on while the snapshot is
            written (and a GPU holds no second copy of the weights).
        into (dict or None): an earlier snapshot (``copy=True``) that is no longer needed; its
            tensors are reused for this one where shape and dtype match. Allocating and
            page-faulting ~100 MB afresh for every save cost the training thread twice the
            time of the copy itself here, and fragmented the heap.
        extra: more entries, e.g. ``iteration``.
    """
    data = {"model": checkpointer.model.state_dict()}
    for key, obj in checkpointer.checkpointables.items():
        data[key] = obj.state_dict()
    data.update(extra)
    return _copy(data, into) if copy else data


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles the numpy arrays of detectron2 model-zoo ``.pkl`` files and nothing else."""

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


class PersistCheckpointer(DetectionCheckpointer):
    """
    A :class:`DetectionCheckpointer` whose writes are atomic and hashed and whose reads are safe.

    It writes what its parent writes, under the same names; it only changes how bytes reach disk
    (:mod:`d2persist.fileio`) and how they are read back (no code execution, verification).
    """

    def save(self, name, **kwargs):
        """Same as :meth:`fvcore.common.checkpoint.Checkpointer.save`, atomically."""
        if not self.save_dir or not self.save_to_disk:
            return
        self.write(f"{name}.pth", snapshot_state(self, copy=False, **kwargs))

    def write(self, basename, data, tag=True):
        """
        Write a snapshot to ``save_dir/basename`` with its sha256 sidecar, then point
        ``last_checkpoint`` at it.

        Args:
            basename (str): file name, e.g. ``model_0000099.pth``.
            data (dict): from :func:`snapshot_state`.
            tag (bool): update ``last_checkpoint``.

        Returns:
            str: the path written.
        """
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        digest, _ = torch_save(data, path)
        write_text(path + SIDECAR_SUFFIX, f"{digest}  {basename}\n")
        if tag:
            self.tag_last_checkpoint(basename)
        return path

    def link(self, src_basename, dst_basename, tag=True):
        """
        Give the checkpoint ``src_basename`` a second name without copying its bytes.

        A hard link where the filesystem has them; a copy written atomically otherwise.
        """
        src = os.path.join(self.save_dir, src_basename)
        dst = os.path.join(self.save_dir, dst_basename)
        tmp = os.path.join(self.save_dir, TEMP_PREFIX + dst_basename + ".link")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        try:
            os.link(src, tmp)
            os.replace(tmp, dst)
            fsync_dir(self.save_dir)
            digest = read_sidecar(src) or sha256_file(dst)
            write_text(dst + SIDECAR_SUFFIX, f"{digest}  {dst_basename}\n")
        except OSError:
            self.write(dst_basename, safe_torch_load(src), tag=False)
        if tag:
            self.tag_last_checkpoint(dst_basename)
        return dst

    def remove(self, basename):
        """Delete a checkpoint and its sidecar."""
        for suffix in ("", SIDECAR_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.save_dir, basename + suffix))

    def tag_last_checkpoint(self, last_filename_basename):
        """Point ``last_checkpoint`` at a checkpoint, atomically."""
        write_text(os.path.join(self.save_dir, LAST_CHECKPOINT), last_filename_basename)

    def get_checkpoint_file(self):
        """The newest checkpoint that verifies (see :func:`find_newest_valid`), or ""."""
        return find_newest_valid(self.save_dir) or ""

    def has_checkpoint(self):
        return bool(self.get_checkpoint_file())

    def resume_or_load(self, path, *, resume=True):
        """
        Like fvcore's, with the choice made by :func:`choose_checkpoint` (for evaluation: an
        output folder holding checkpoints is not refused without ``resume``).
        """
        newest = choose_checkpoint(self.save_dir, resume, refuse_existing=False)
        if newest:
            return _load_chosen(self, newest)
        return self.load(path, checkpointables=[])

    def _load_file(self, filename):
        if filename.endswith(".pkl"):  # detectron2 model zoo: numpy arrays only, never code
            try:
                with open(filename, "rb") as f:
                    data = _ArrayOnlyUnpickler(f, encoding="latin1").load()
            except pickle.UnpicklingError as e:
                raise UnsafeArtifactError(f"Refusing to load {filename}: {e}.") from None
            if "model" in data and "__author__" in data:
                return data
            data = data.get("blobs", data)
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".safetensors"):
            from safetensors.torch import load_file

            return {"model": load_file(filename)}
        return super()._load_file(filename)

    def _torch_load(self, f):
        return safe_torch_load(f)
