"""
A read-only view of a run folder or of an export bundle: which files are there, what each one is,
and whether it verifies (``d2persist ls`` and ``d2persist verify``).

It never takes the run lock and writes nothing, so it works on a run that is still training, on a
stock detectron2 run folder (no sidecars, no ``config.yaml``: what a run never had is a note, not
damage) and on a bundle alone.
"""

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from .checkpoint import list_checkpoints, read_sidecar, verify_checkpoint
from .errors import ArtifactError, D2PersistError
from .fileio import safe_torch_load, safe_yaml_load
from .layout import (
    BEST_NAME,
    BEST_RECORD,
    CONFIG_NAME,
    FINAL_NAME,
    LAST_CHECKPOINT,
    MANIFEST_NAME,
    METRICS_NAME,
    ONNX_INT8_NAME,
    ONNX_NAME,
    checkpoint_iteration,
)
from .manifest import persist_options_of_run, read_manifest

__all__ = ["RunView", "CheckpointEntry", "open_view", "metrics_json_history", "describe", "diff",
           "EVAL_TASKS"]

#: The prefixes of the metrics evaluators store (``bbox/AP``): the rest of metrics.json is
#: training's own scalars (losses, learning rate, ``fast_rcnn/...``).
EVAL_TASKS = ("bbox", "segm", "keypoints", "sem_seg", "panoptic_seg", "box_proposals")


def _rows(path: str) -> List[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut by a crash, or one still being written
                    continue
                if isinstance(row, dict) and "iteration" in row:
                    rows.append(row)
    except OSError:
        pass
    return rows


def metrics_json_history(path: str) -> Callable[[str], List[Tuple[float, int]]]:
    """
    Metric name -> its ``[(value, iteration), ...]`` from detectron2's ``metrics.json`` (one
    JSON object per line, each with its ``iteration``); empty if the file is missing.
    """
    rows = _rows(path)
    return lambda key: [(r[key], r["iteration"]) for r in rows
                        if isinstance(r.get(key), (int, float))]


@dataclass
class CheckpointEntry:
    """
    One checkpoint of a run.

    Attributes:
        name (str): its file name. iteration (int or None): the iteration it holds, when the
        name, a hard link or best.json tells it without loading the file. size (int): bytes.
        mtime (float): modification time. markers (list[str]): "last" (``last_checkpoint``
        names it), "best", "final". metrics (dict): the evaluation stored at its iteration.
    """

    name: str
    iteration: Optional[int]
    size: int
    mtime: float
    markers: List[str] = field(default_factory=list)
    metrics: Dict[str, float] = field(default_factory=dict)


class RunView:
    """
    What a run folder or a bundle holds. Build it with :func:`open_view`.

    Attributes:
        path (str): the folder. kind (str): "run" or "bundle".
    """

    def __init__(self, path: str, kind: str):
        self.path = path
        self.kind = kind
        self._metrics = None

    # -- run folder --------------------------------------------------------------------------
    def _file(self, name):
        return os.path.join(self.path, name)

    def last_checkpoint(self) -> Optional[str]:
        """The name ``last_checkpoint`` holds, or None."""
        try:
            with open(self._file(LAST_CHECKPOINT), encoding="utf-8") as f:
                return f.read().strip() or None
        except OSError:
            return None

    def metrics_rows(self) -> List[dict]:
        """The rows of ``metrics.json`` (read once)."""
        if self._metrics is None:
            self._metrics = _rows(self._file(METRICS_NAME))
        return self._metrics

    def evaluations(self) -> Dict[int, Dict[str, float]]:
        """Iteration -> the evaluation metrics stored under it (``bbox/AP``, ...)."""
        out = {}
        for row in self.metrics_rows():
            found = {k: v for k, v in row.items()
                     if "/" in k and k.split("/", 1)[0] in EVAL_TASKS}
            if found:
                out.setdefault(int(row["iteration"]), {}).update(found)
        return out

    def best_record(self) -> Optional[dict]:
        try:
            with open(self._file(BEST_RECORD), encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def checkpoints(self) -> List[CheckpointEntry]:
        """Every checkpoint, newest first (``model_final.pth``, periodic ones, then the best)."""
        names = list_checkpoints(self.path)
        if os.path.isfile(self._file(BEST_NAME)):
            names.append(BEST_NAME)
        stats = {n: os.stat(self._file(n)) for n in names if os.path.isfile(self._file(n))}
        inode = {n: (s.st_dev, s.st_ino) for n, s in stats.items()}
        last, best = self.last_checkpoint(), self.best_record() or {}
        training = [int(r["iteration"]) for r in self.metrics_rows() if "total_loss" in r]
        evaluations = self.evaluations()
        entries = []
        for name, st in stats.items():
            it = checkpoint_iteration(name)
            twins = [n for n in stats if n != name and inode[n] == inode[name]]
            if it is None:  # a hard link to a periodic checkpoint tells its iteration
                it = next((checkpoint_iteration(n) for n in twins
                           if checkpoint_iteration(n) is not None), None)
            if it is None and name == BEST_NAME and isinstance(best.get("iteration"), int):
                it = best["iteration"]
            if it is None and name == FINAL_NAME and training:
                it = max(training)
            markers = [m for m, hit in (
                ("last", last in [name] + twins), ("best", BEST_NAME in [name] + twins),
                ("final", FINAL_NAME in [name] + twins)) if hit]
            metrics = {}
            if it is not None:  # after_train's evaluation is stored under MAX_ITER (it + 1)
                metrics = evaluations.get(it) or (
                    evaluations.get(it + 1, {}) if "final" in markers else {})
            entries.append(CheckpointEntry(name, it, st.st_size, st.st_mtime, markers, metrics))
        return entries

    def export_dir(self) -> Optional[str]:
        """The bundle folder: the view itself, or the run's export folder if it exists."""
        if self.kind == "bundle":
            return self.path
        name = persist_options_of_run(self.path).get("EXPORT_DIR", "export") if os.path.isfile(
            self._file("persist.yaml")) else "export"
        folder = os.path.join(self.path, name)
        return folder if os.path.isdir(folder) else None

    def export(self) -> Optional[dict]:
        """
        The bundle's summary: ``folder``, ``complete``, ``formats``, ``source``, ``iteration``,
        ``evaluation`` (the manifest's ``failed`` and per-backend box / mask AP); None without one.
        """
        folder = self.export_dir()
        if folder is None:
            return None
        try:
            manifest = read_manifest(folder, verify=False)
        except ArtifactError:
            return {"folder": folder, "complete": False}
        files = manifest.get("files") or {}
        formats = [f for f, n in (("safetensors", manifest.get("weights")), ("onnx", ONNX_NAME),
                                  ("onnx-int8", ONNX_INT8_NAME)) if n in files]
        entry = manifest.get("evaluation") or None
        evaluation = None
        if isinstance(entry, dict):
            evaluation = {"dataset": entry.get("dataset"), "failed": entry.get("failed", []),
                          "backends": {b: {k: v for k, v in m.items() if k in (
                              "bbox/AP", "segm/AP")} for b, m in entry.get(
                              "backends", {}).items()}}
        return {"folder": folder, "complete": True, "formats": formats,
                "source": manifest.get("source"), "iteration": manifest.get("iteration"),
                "evaluation": evaluation}

    def mirror(self) -> Optional[str]:
        """The run's configured mirror URL (PERSIST.MIRROR), or None."""
        if self.kind != "run" or not os.path.isfile(self._file("persist.yaml")):
            return None
        return persist_options_of_run(self.path).get("MIRROR") or None

    # -- verification ------------------------------------------------------------------------
    def verify(self, progress: bool = False) -> Tuple[List[str], List[str]]:
        """
        Check everything the folder holds.

        Returns:
            tuple: ``(problems, notes)``: one line per damaged or inconsistent file, and one per
            thing that could not be checked because the run never had it.
        """
        problems, notes = [], []
        if self.kind == "run":
            self._verify_run(problems, notes, progress)
        folder = self.export_dir()
        if folder is not None:
            self._verify_bundle(folder, problems, notes)
        return problems, notes

    def _verify_run(self, problems, notes, progress):
        entries = self.checkpoints()
        items = entries
        if progress and len(entries) > 1:
            from tqdm import tqdm

            items = tqdm(entries, unit="checkpoint", desc="verify")
        good = set()
        unsidecarred = []
        for e in items:
            path = self._file(e.name)
            if read_sidecar(path) is None:
                unsidecarred.append(e.name)
            try:
                why = verify_checkpoint(path)
            except ArtifactError as err:  # a hostile pickle is damage too
                why = str(err)
            if why is None:
                good.add(e.name)
            else:
                problems.append(f"{path}: {why}.")
        if unsidecarred:
            notes.append(f"{len(unsidecarred)} checkpoint(s) without a .sha256 sidecar (written "
                         "by stock detectron2): verified by loading them safely.")
        last = self.last_checkpoint()
        if last is None:
            if entries:
                notes.append(f"No {LAST_CHECKPOINT}: nothing names the checkpoint to resume from.")
        elif last not in good:
            state = "does not verify" if os.path.exists(self._file(last)) else "is missing"
            problems.append(f"{self._file(LAST_CHECKPOINT)} names {last}, which {state}.")
        record = self.best_record()
        if record is not None or BEST_NAME in good:
            self._verify_best(record, problems)
        config = self._file(CONFIG_NAME)
        if os.path.isfile(config):
            try:
                safe_yaml_load(config)
            except ArtifactError as e:
                problems.append(f"{config}: {e}")
        else:
            notes.append(f"No {CONFIG_NAME}: the run's config could not be checked.")

    def _verify_best(self, record, problems):
        path = self._file(BEST_NAME)
        if record is None:
            problems.append(f"{path} has no {BEST_RECORD} saying which evaluation it is.")
            return
        if not os.path.isfile(path):
            problems.append(f"{self._file(BEST_RECORD)} records a best model, but {BEST_NAME} "
                            "is missing.")
            return
        try:
            held = safe_torch_load(path).get("iteration")
        except (ArtifactError, AttributeError):
            return  # reported as a damaged checkpoint already
        if held != record.get("iteration"):
            problems.append(f"{self._file(BEST_RECORD)} says iteration {record.get('iteration')}"
                            f", but {BEST_NAME} holds iteration {held}.")

    def _verify_bundle(self, folder, problems, notes):
        if not os.path.isfile(os.path.join(folder, MANIFEST_NAME)):
            problems.append(f"{folder} has no {MANIFEST_NAME}: an incomplete export.")
            return
        try:
            manifest = read_manifest(folder, verify=False)
        except ArtifactError as e:
            problems.append(str(e))
            return
        damaged = set()
        for name in manifest["files"]:  # each file on its own: one line per damaged file
            try:
                read_manifest(folder, only=[name])
            except ArtifactError as e:
                problems.append(str(e))
                damaged.add(name)
        for name in (ONNX_NAME, ONNX_INT8_NAME):
            if name not in manifest.get("files", {}) or name in damaged:
                continue
            try:
                import onnxruntime as ort
            except ImportError:
                notes.append(f"onnxruntime is not installed: {name} was checked against its "
                             "sha256 only.")
                continue
            try:
                ort.InferenceSession(os.path.join(folder, name),
                                     providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 (ONNX Runtime raises its own kinds)
                problems.append(f"{os.path.join(folder, name)} does not open in ONNX Runtime "
                                f"({type(e).__name__}).")


def open_view(path: str) -> RunView:
    """
    The view of ``path``: a bundle (it holds ``manifest.json``) or a run folder (checkpoints,
    ``last_checkpoint``, ``config.yaml`` or ``metrics.json``).

    Raises:
        D2PersistError: ``path`` is neither, in one sentence.
    """
    if not os.path.isdir(path):
        raise D2PersistError(f"{path} is not a folder (a run's OUTPUT_DIR or an export bundle).")
    if os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        return RunView(path, "bundle")
    markers = (LAST_CHECKPOINT, CONFIG_NAME, METRICS_NAME, BEST_RECORD)
    if list_checkpoints(path) or any(os.path.isfile(os.path.join(path, m)) for m in markers):
        return RunView(path, "run")
    raise D2PersistError(f"{path} is neither a run folder (no checkpoints, {LAST_CHECKPOINT}, "
                         f"{CONFIG_NAME} or {METRICS_NAME}) nor an export bundle (no "
                         f"{MANIFEST_NAME}).")


def _plain(v):
    """Tuples (a merged CfgNode's) as lists (YAML's), so that equal values compare equal."""
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def _flatten(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = _plain(v)
    return out


def describe(path: str) -> dict:
    """
    What ``d2persist diff`` compares of a run folder, a bundle or a config file: ``config``
    (flattened dotted keys), ``persist`` (d2persist's options), ``classes``, ``last_iteration``
    and ``final`` (the last evaluation's metrics).

    Raises:
        D2PersistError: ``path`` is none of these, in one sentence.
    """
    if os.path.isfile(path):
        if not path.endswith((".yaml", ".yml")):
            raise D2PersistError(f"{path} is not a config file (.yaml), a run folder or a bundle.")
        config = safe_yaml_load(path)
        if not isinstance(config, dict):
            raise D2PersistError(f"{path} does not hold a config mapping.")
        persist = config.pop("PERSIST", None)
        if "MODEL" in config and "_BASE_" not in config:  # a yacs file: onto get_cfg()
            from .runconfig import load_config_dict

            try:
                config = load_config_dict(config, new_allowed=True)
            except (KeyError, ValueError, AssertionError) as e:
                raise D2PersistError(f"{path} does not load as a detectron2 config ({e}).") \
                    from None
            config.pop("PERSIST", None)
        return {"kind": "config", "config": _flatten(config), "persist": persist or {},
                "classes": None, "last_iteration": None, "final": {}}
    view = open_view(path)
    if view.kind == "bundle":
        manifest = read_manifest(path, verify=False)
        config = safe_yaml_load(os.path.join(path, manifest.get("config", CONFIG_NAME)))
        evaluation = manifest.get("evaluation") or {}
        return {"kind": "bundle", "config": _flatten(config), "persist": {},
                "classes": (manifest.get("metadata") or {}).get("thing_classes"),
                "last_iteration": manifest.get("iteration"),
                "final": (evaluation.get("backends") or {}).get("pytorch") or {}}
    config_path = view._file(CONFIG_NAME)
    config = safe_yaml_load(config_path) if os.path.isfile(config_path) else {}
    persist = (persist_options_of_run(path) if os.path.isfile(view._file("persist.yaml"))
               else {})
    try:
        with open(view._file("metadata.json"), encoding="utf-8") as f:
            classes = json.load(f).get("thing_classes")
    except (OSError, ValueError, AttributeError):
        classes = None
    rows = view.metrics_rows()
    evaluations = view.evaluations()
    return {"kind": "run", "config": _flatten(config), "persist": persist, "classes": classes,
            "last_iteration": max((int(r["iteration"]) for r in rows if "total_loss" in r),
                                  default=None),
            "final": evaluations[max(evaluations)] if evaluations else {}}


def diff(a: str, b: str) -> dict:
    """
    ``d2persist diff A B``: ``config`` and ``persist`` as ``{key: [a, b]}`` for the keys whose
    values differ (a side lacking the key holds None: added or removed), ``classes``,
    ``last_iteration`` and ``final`` of each side as ``[a, b]``.
    """
    sa, sb = describe(a), describe(b)

    def changed(x, y):
        return {k: [x.get(k), y.get(k)] for k in sorted(set(x) | set(y))
                if x.get(k, _MISSING) != y.get(k, _MISSING)}

    return {"kinds": [sa["kind"], sb["kind"]], "config": changed(sa["config"], sb["config"]),
            "persist": changed(_flatten(sa["persist"]), _flatten(sb["persist"])),
            "classes": [sa["classes"], sb["classes"]],
            "last_iteration": [sa["last_iteration"], sb["last_iteration"]],
            "final": [sa["final"], sb["final"]]}


_MISSING = object()
