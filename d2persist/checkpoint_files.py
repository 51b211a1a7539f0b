"""
Names, listing and verification of checkpoint files (no training code: prediction uses it too).

Next to each checkpoint d2persist writes lies a ``.sha256`` sidecar in ``sha256sum`` format, so
``sha256sum -c model_0000099.pth.sha256`` checks it by hand too.
"""

import logging
import os
import re

from .errors import ArtifactError, UnsafeArtifactError
from .fileio import safe_torch_load, sha256_file

__all__ = [
    "FINAL_NAME",
    "LAST_CHECKPOINT",
    "SIDECAR_SUFFIX",
    "checkpoint_name",
    "list_checkpoints",
    "read_sidecar",
    "verify_checkpoint",
    "find_newest_valid",
]

logger = logging.getLogger(__name__)

#: Name of the checkpoint written when training completes.
FINAL_NAME = "model_final.pth"
#: The pointer file detectron2 reads to find the checkpoint to resume from.
LAST_CHECKPOINT = "last_checkpoint"
_PERIODIC = re.compile(r"^model_(\d{7,})\.pth$")
SIDECAR_SUFFIX = ".sha256"


def checkpoint_name(iteration):
    """The file name detectron2's PeriodicCheckpointer uses for ``iteration``."""
    return f"model_{iteration:07d}.pth"


def list_checkpoints(folder):
    """
    Checkpoints in ``folder``, newest first: ``model_final.pth``, then periodic ones by iteration.

    Returns:
        list[str]: file names.
    """
    if not os.path.isdir(folder):
        return []
    periodic = []
    for name in os.listdir(folder):
        m = _PERIODIC.match(name)
        if m:
            periodic.append((int(m.group(1)), name))
    names = [n for _, n in sorted(periodic, reverse=True)]
    if os.path.isfile(os.path.join(folder, FINAL_NAME)):
        names.insert(0, FINAL_NAME)
    return names


def read_sidecar(path):
    """The sha256 recorded next to checkpoint ``path``, or None."""
    try:
        with open(path + SIDECAR_SUFFIX, "r", encoding="utf-8") as f:
            return f.read().split()[0]
    except (FileNotFoundError, IndexError):
        return None


def verify_checkpoint(path):
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
        actual = sha256_file(path)
        return None if actual == expected else f"its sha256 {actual[:12]}… does not match"
    try:
        data = safe_torch_load(path)
    except UnsafeArtifactError:
        raise  # a hostile file is refused loudly, never skipped over
    except ArtifactError as e:
        return str(e)
    if not isinstance(data, dict) or "model" not in data:
        return "it holds no 'model' state"
    return None


def find_newest_valid(folder):
    """
    The newest checkpoint in ``folder`` that verifies, warning about each newer one that does not.

    ``last_checkpoint``'s target is tried first, then every other checkpoint newest first.

    Returns:
        str or None: the path, or None if no checkpoint verifies.
    """
    names = list_checkpoints(folder)
    try:
        with open(os.path.join(folder, LAST_CHECKPOINT), "r", encoding="utf-8") as f:
            tagged = f.read().strip()
    except FileNotFoundError:
        tagged = None
    if tagged and not os.path.isabs(tagged) and os.sep not in tagged:
        names = [tagged] + [n for n in names if n != tagged]
    for name in names:
        path = os.path.join(folder, name)
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        logger.warning(
            "Checkpoint %s is not usable (%s); falling back to an older one.", path, problem
        )
    return None
