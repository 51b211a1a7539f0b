"""
Checkpoints that stock detectron2 can read, written atomically and hashed.

File names and contents are detectron2's (``model_{iter:07d}.pth``, ``model_final.pth``,
``last_checkpoint``; keys ``model``, ``trainer``, ``iteration``), so ``DetectionCheckpointer``
and ``DefaultTrainer.resume_or_load`` read them unchanged. Next to each checkpoint d2persist
writes lies a ``.sha256`` sidecar in ``sha256sum`` format, so ``sha256sum -c
model_0000099.pth.sha256`` checks it by hand too. The snapshot a background write saves is taken
here (:func:`snapshot_state`); what a run resumes from is decided in :mod:`.resume`.
"""

import contextlib
import logging
import os
import pickle
from typing import TYPE_CHECKING, Any, Dict, Optional

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..artifacts.checkpoints import checkpoint_sha256, evaluated_weights
from ..artifacts.view import find_newest_valid
from ..errors import UnsafeArtifactError
from ..files.atomic import fsync_dir, torch_save, write_text
from ..files.safe_load import safe_torch_load
from ..layout import LAST_CHECKPOINT, SIDECAR_SUFFIX, TEMP_PREFIX
from .resume import _load_chosen, choose_checkpoint

if TYPE_CHECKING:
    from fvcore.common.checkpoint import Checkpointer

__all__ = ["PersistCheckpointer", "snapshot_state", "all_finite"]

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


def snapshot_state(checkpointer: "Checkpointer", copy: bool, into: Optional[dict] = None,
                   **extra: Any) -> Dict[str, Any]:
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
    (:mod:`d2persist.files`) and how they are read back (no code execution, verification).
    """

    def __init__(self, model: torch.nn.Module, save_dir: str = "", *,
                 evaluated_weights: bool = False, **kwargs: Any) -> None:
        """
        Args:
            model, save_dir, kwargs: as :class:`DetectionCheckpointer`'s.
            evaluated_weights (bool): load the weights the run evaluated (a checkpoint's EMA
                average when its run evaluated that, see
                :func:`d2persist.artifacts.checkpoints.evaluated_weights`) instead of the
                training weights: for evaluation and prediction, never for a resume.
        """
        super().__init__(model, save_dir, **kwargs)
        self._evaluated = evaluated_weights

    def save(self, name: str, **kwargs: Any) -> None:
        """Same as :meth:`fvcore.common.checkpoint.Checkpointer.save`, atomically."""
        if not self.save_dir or not self.save_to_disk:
            return
        self.write(f"{name}.pth", snapshot_state(self, copy=False, **kwargs))

    def write(self, basename: str, data: dict, tag: bool = True) -> str:
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
        self._forget_sidecar(path)
        digest, _ = torch_save(data, path)
        write_text(path + SIDECAR_SUFFIX, f"{digest}  {basename}\n")
        if tag:
            self.tag_last_checkpoint(basename)
        return path

    def link(self, src_basename: str, dst_basename: str, tag: bool = True) -> str:
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
            self._forget_sidecar(dst)
            os.replace(tmp, dst)
            fsync_dir(self.save_dir)
            digest = checkpoint_sha256(src)  # (dst: the same bytes)
            write_text(dst + SIDECAR_SUFFIX, f"{digest}  {dst_basename}\n")
        except OSError:
            self.write(dst_basename, safe_torch_load(src), tag=False)
        if tag:
            self.tag_last_checkpoint(dst_basename)
        return dst

    def _forget_sidecar(self, path: str) -> None:
        """
        Remove the sidecar of a checkpoint about to be replaced (a name written again: a
        replayed iteration, ``model_final.pth``, ``model_best.pth``), before it is: killed in
        between, the new file is found without one (verified by loading) instead of with the
        old one's hash (reported damaged, refused).
        """
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + SIDECAR_SUFFIX)
            fsync_dir(self.save_dir)

    def remove(self, basename: str) -> None:
        """Delete a checkpoint and its sidecar."""
        for suffix in ("", SIDECAR_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.save_dir, basename + suffix))

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``last_checkpoint`` at a checkpoint, atomically."""
        write_text(os.path.join(self.save_dir, LAST_CHECKPOINT), last_filename_basename)

    def get_checkpoint_file(self) -> str:
        """The newest checkpoint that verifies (see :func:`find_newest_valid`), or ""."""
        return find_newest_valid(self.save_dir) or ""

    def has_checkpoint(self) -> bool:
        return bool(self.get_checkpoint_file())

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
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
        data = super()._load_file(filename)
        if self._evaluated:
            data["model"] = evaluated_weights(data)[0]
        return data

    def _torch_load(self, f):
        return safe_torch_load(f)
