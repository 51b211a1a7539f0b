"""
A run folder's checkpoints: their names, the order to resume in, their sidecars, and whether
one verifies (sha256 against its sidecar, or a safe load when it has none).
"""

import logging
import os
import re
from typing import Any, Dict, Iterable, List, Optional, Tuple

from ..errors import ArtifactError, UnsafeArtifactError
from ..files.atomic import sha256_file
from ..files.safe_load import safe_torch_load
from ..layout import EMA_STATE_KEY, FINAL_NAME, SIDECAR_SUFFIX, checkpoint_iteration
from .folders import _Folder, _LocalFolder

__all__ = ["read_sidecar", "checkpoint_sha256", "sidecar_problem", "verify_checkpoint",
           "resume_candidates", "evaluated_weights"]

logger = logging.getLogger(__name__)

_SHA256 = re.compile("[0-9a-fA-F]{64}")


# -- checkpoints ------------------------------------------------------------------------------


def evaluated_weights(checkpoint: Dict[str, Any]) -> Tuple[Dict[str, Any], Optional[dict]]:
    """
    The weights a run evaluated at a checkpoint: the EMA average it holds when the run evaluated
    that (``PERSIST.EMA_DECAY`` with ``EMA_EVAL``), else its ``model``.

    Args:
        checkpoint (dict): a loaded checkpoint (or a bare state dict).

    Returns:
        ``(weights, ema)``: name -> tensor, and ``{"decay", "updates", "warmup"}`` of the average
        when the weights are one, else None.
    """
    trainer = checkpoint.get("trainer")
    hooks = trainer.get("hooks") if isinstance(trainer, dict) else None
    for state in hooks.values() if isinstance(hooks, dict) else ():
        ema = state.get(EMA_STATE_KEY) if isinstance(state, dict) else None
        if isinstance(ema, dict) and ema.get("evaluated") and isinstance(ema.get("model"), dict):
            return ema["model"], {k: ema.get(k) for k in ("decay", "warmup", "updates")}
    model = checkpoint.get("model", checkpoint)
    return model, None


def _checkpoint_names(names: Iterable[str]) -> List[str]:
    """The checkpoints among ``names``, newest first: ``model_final.pth``, then periodic ones."""
    names = list(names)
    periodic = sorted((n for n in names if checkpoint_iteration(n) is not None),
                      key=checkpoint_iteration, reverse=True)  # type: ignore[arg-type]
    return ([FINAL_NAME] if FINAL_NAME in names else []) + periodic


def resume_candidates(names: Iterable[str], tagged: Optional[str]) -> List[str]:
    """
    The checkpoints among ``names`` to try resuming from, in order: ``tagged``
    (``last_checkpoint``'s target) if it is a plain file name, then ``model_final.pth``, then
    periodic checkpoints newest first.
    """
    ordered = _checkpoint_names(names)
    if tagged and os.sep not in tagged and "/" not in tagged:
        ordered = [tagged] + [n for n in ordered if n != tagged]
    return ordered


def read_sidecar(path: str) -> Optional[str]:
    """The sha256 recorded next to checkpoint ``path``, or None."""
    return _sidecar(_LocalFolder(os.path.dirname(path)), os.path.basename(path))


def checkpoint_sha256(path: str) -> str:
    """The sha256 of checkpoint ``path``: as its sidecar records it, else hashed."""
    return read_sidecar(path) or sha256_file(path)


def _sidecar(folder: _Folder, name: str) -> Optional[str]:
    """
    The sidecar's sha256; None without one (or an empty one), "" for one that is garbled (not
    a sha256: it matches no file, so the checkpoint cannot be verified).
    """
    data = folder.read(name + SIDECAR_SUFFIX)
    try:
        digest = data.decode("utf-8").split()[0] if data else None
    except IndexError:
        return None
    except UnicodeDecodeError:
        return ""
    if digest is None:
        return None
    return digest.lower() if _SHA256.fullmatch(digest) else ""


def sidecar_problem(name: str, expected: str, actual: str) -> Optional[str]:
    """
    Why checkpoint ``name`` does not verify against its sidecar.

    Args:
        name (str): the checkpoint's file name.
        expected (str): its sidecar's sha256 ("" for a garbled sidecar).
        actual (str): the file's sha256.

    Returns:
        str or None: the reason, or None if it verifies.
    """
    if expected == "":
        return (f"its sidecar {name}{SIDECAR_SUFFIX} holds no sha256 (damaged): the checkpoint "
                "cannot be verified")
    return None if actual == expected else f"its sha256 {actual[:12]}… does not match"


def _safely_loadable(path: str) -> Optional[str]:
    """Why the stock checkpoint at ``path`` is not usable (None if it is): safe loading."""
    try:
        data = safe_torch_load(path)
    except UnsafeArtifactError:
        raise  # a hostile file is refused loudly, never skipped over
    except ArtifactError as e:
        return str(e)
    if not isinstance(data, dict) or "model" not in data:
        return "it holds no 'model' state"
    return None


def verify_checkpoint(path: str) -> Optional[str]:
    """
    Check that the checkpoint at ``path`` is whole.

    With a ``.sha256`` sidecar (every checkpoint d2persist writes has one) the file's hash must
    match it; without one (a checkpoint stock detectron2 wrote) it must load safely and hold a
    ``model``.

    Returns:
        str or None: None if the checkpoint is good, else why it is not.
    """
    if not os.path.isfile(path):
        return "it does not exist"
    expected = read_sidecar(path)
    if expected is not None:
        return sidecar_problem(os.path.basename(path), expected, sha256_file(path))
    return _safely_loadable(path)
