"""
``artifacts``: the run folder and the export bundle, read side. Only this package knows how they
are laid out on disk or at a mirror URL: the one read-only view (which files, what each is,
whether it verifies), the checkpoints' names and resume order, the manifest's meaning,
``ls``/``verify``/``diff``/``plot``, and what a path a user gives resolves to. Imports neither
torch nor detectron2 (``plot`` imports matplotlib when it draws).
"""

from .bundle import (
    FORMAT,
    LOADED,
    find_bundle,
    persist_options_of_run,
    read_manifest,
    software_versions,
)
from .checkpoints import read_sidecar, resume_candidates, verify_checkpoint
from .describe import describe, diff
from .manifest import (
    EVAL_CHECKED,
    EVAL_TOLERANCE,
    describe_source,
    evaluation_problem,
    export_backends,
    local_bundle,
    metadata_from_json,
)
from .problems import PROBLEM_KINDS, Problem
from .resolve import Artifacts, resolve_artifacts
from .view import (
    EVAL_TASKS,
    CheckpointEntry,
    RunView,
    find_newest_valid,
    list_checkpoints,
    metrics_json_history,
    open_view,
)

__all__ = [
    "list_checkpoints",
    "FORMAT",
    "LOADED",
    "find_bundle",
    "persist_options_of_run",
    "read_manifest",
    "software_versions",
    "read_sidecar",
    "resume_candidates",
    "verify_checkpoint",
    "describe",
    "diff",
    "EVAL_CHECKED",
    "EVAL_TOLERANCE",
    "describe_source",
    "evaluation_problem",
    "export_backends",
    "local_bundle",
    "metadata_from_json",
    "PROBLEM_KINDS",
    "Problem",
    "Artifacts",
    "resolve_artifacts",
    "EVAL_TASKS",
    "CheckpointEntry",
    "RunView",
    "find_newest_valid",
    "metrics_json_history",
    "open_view",
]
