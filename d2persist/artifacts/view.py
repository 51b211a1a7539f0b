"""
The one reader of a run folder and of an export bundle: which files are there, what each one is,
and whether it verifies. The resume decision (which checkpoint, in which order), artifact
resolution, the mirror download and ``d2persist ls/verify/diff/plot`` all ask the view instead
of listing files themselves.

It never takes the run lock and writes nothing, so it works on a run that is still training, on a
stock detectron2 run folder (no sidecars, no ``config.yaml``: what a run never had is a note, not
damage), on a bundle alone, and on a mirror URL (``s3://...``, any fsspec location). Nothing here
imports torch unless a checkpoint without a sidecar has to be loaded to be checked.
"""

import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import ArtifactError, D2PersistError, UnsafeArtifactError
from ..files.atomic import file_identity, sha256_file
from ..files.safe_load import safe_torch_load, safe_yaml_loads
from ..layout import (
    BEST_NAME,
    BEST_RECORD,
    CONFIG_NAME,
    CONFIG_PICKLE,
    DEFAULT_EXPORT_DIR,
    EVALUATIONS_NAME,
    FINAL_NAME,
    LAST_CHECKPOINT,
    MANIFEST_NAME,
    METADATA_NAME,
    METRICS_NAME,
    MODEL_FILES,
    ONNX_INT8_NAME,
    ONNX_NAME,
    PERSIST_FILE,
    PYTORCH,
    checkpoint_iteration,
    checkpoint_name,
)
from .bundle import _bundle_file, _bundle_file_problem, _parse_manifest, _persist_options
from .checkpoints import (
    _checkpoint_names,
    _safely_loadable,
    _sidecar,
    read_sidecar,
    resume_candidates,
    sidecar_problem,
    verify_checkpoint,
)
from .folders import _PROGRESS_BYTES, _Folder, _folder, _LocalFolder, _MirrorFolder
from .problems import DAMAGED, INCOMPLETE, INCONSISTENT, MISSING, Problem

__all__ = [
    "list_checkpoints",
    "EVAL_TASKS",
    "RunView",
    "CheckpointEntry",
    "open_view",
    "metrics_json_history",
    "find_newest_valid",
    "newest_valid_noted",
]

logger = logging.getLogger(__name__)
#: The prefixes of the metrics evaluators store (``bbox/AP``), and of the validation loss
#: (``validation/total_loss``, PERSIST.VAL_LOSS): the rest of metrics.json is training's own
#: scalars (losses, learning rate, ``fast_rcnn/...``).
EVAL_TASKS = ("bbox", "segm", "keypoints", "sem_seg", "panoptic_seg", "box_proposals",
              "validation")


# -- the view ---------------------------------------------------------------------------------

def _rows(data: Optional[bytes]) -> List[dict]:
    rows = []
    for line in (data or b"").decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut by a crash, or one still being written
            continue
        if isinstance(row, dict) and "iteration" in row:
            rows.append(row)
    return rows


def metrics_json_history(path: str) -> Callable[[str], List[Tuple[float, int]]]:
    """
    Metric name -> its ``[(value, iteration), ...]`` from detectron2's ``metrics.json`` (one
    JSON object per line, each with its ``iteration``); empty if the file is missing.
    """
    rows = _rows(_LocalFolder(os.path.dirname(path)).read(os.path.basename(path)))
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
    What a run folder or a bundle holds, here or at a mirror URL. Build it with
    :func:`open_view` (which tells which one ``path`` is).

    Attributes:
        path (str): the folder or URL. kind (str): "run" or "bundle". remote (bool): a URL.
    """

    def __init__(self, path: str, kind: str, source: Optional[_Folder] = None) -> None:
        self._folder: _Folder = source or _folder(path)
        self.path: str = self._folder.path
        self.kind = kind
        self.remote: bool = self._folder.remote
        self._metrics: Optional[List[dict]] = None
        self._evaluation_file: Optional[dict] = None

    def where(self, name: str) -> str:
        """Where the file ``name`` of this folder is (a path or a URL)."""
        return self._folder.where(name)

    def names(self) -> List[str]:
        """The names of the files directly in the folder."""
        return self._folder.names()

    def read(self, name: str) -> Optional[bytes]:
        """The bytes of the file ``name``, or None if there is none."""
        return self._folder.read(name)

    def download(self, name: str, local: str) -> None:
        """Copy the mirror's file ``name`` to the local path ``local``, atomically."""
        if not self.remote:
            raise ValueError(f"{self.path} is a local folder: nothing to download.")
        assert isinstance(self._folder, _MirrorFolder)  # the folder of a remote view
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        self._folder.mirror.get(name, local)

    # -- run folder --------------------------------------------------------------------------
    def _text(self, name):
        data = self._folder.read(name)
        try:
            return data.decode("utf-8") if data is not None else None
        except UnicodeDecodeError:
            return None

    def has(self, name: str) -> bool:
        """Whether the folder holds the file ``name``."""
        return self._folder.stat(name) is not None

    def last_checkpoint(self) -> Optional[str]:
        """The name ``last_checkpoint`` holds, or None."""
        return (self._text(LAST_CHECKPOINT) or "").strip() or None

    def checkpoint_names(self) -> List[str]:
        """The checkpoints' file names, newest first (without ``model_best.pth``)."""
        return [n for n in _checkpoint_names(self._folder.names())
                if self._folder.stat(n) is not None]

    def resume_candidates(self) -> List[str]:
        """
        The checkpoints to try resuming from, in order (see :func:`resume_candidates`); at a
        mirror, only names that are there.
        """
        names = self._folder.names()
        tagged = self.last_checkpoint()
        if self.remote and tagged not in names:
            tagged = None  # never download what is not there
        return resume_candidates(names, tagged)

    def metrics_rows(self) -> List[dict]:
        """The rows of ``metrics.json`` (read once)."""
        if self._metrics is None:
            self._metrics = _rows(self._folder.read(METRICS_NAME))
        return self._metrics

    def _evaluations_file(self) -> dict:
        """``evaluations.json`` (PersistHook's record of every evaluation), or {}."""
        if self._evaluation_file is None:
            try:
                data = json.loads(self._text(EVALUATIONS_NAME) or "{}")
            except ValueError:
                data = {}
            self._evaluation_file = data if isinstance(data, dict) else {}
        return self._evaluation_file

    def evaluation_records(self) -> List[dict]:
        """
        Every evaluation PersistHook recorded, oldest first: ``{"iteration": the iteration of
        the weights evaluated, "metrics": {name: value or None}}``; [] without the record (a
        stock detectron2 run, or one written before d2persist kept it).
        """
        records = self._evaluations_file().get("evaluations")
        return [r for r in records or [] if isinstance(r, dict)
                and isinstance(r.get("iteration"), int) and isinstance(r.get("metrics"), dict)]

    def early_stop(self) -> Optional[dict]:
        """
        The early stopping's state when the run used it (``metric``, ``patience``,
        ``min_delta``, ``best``, ``best_iteration``, ``without_improvement``, and
        ``stopped_after``: the last iteration trained when it stopped the run, else None).
        """
        record = self._evaluations_file().get("early_stop")
        return record if isinstance(record, dict) else None

    def evaluations(self) -> Dict[int, Dict[str, float]]:
        """
        Iteration -> the evaluation metrics of the weights of that iteration (``bbox/AP``, ...):
        ``evaluations.json``'s records where the run has them, else what ``metrics.json`` kept
        (under the iteration it stored them at: after_train's evaluation under MAX_ITER).
        """
        records = self.evaluation_records()
        first = records[0]["iteration"] if records else None
        out: Dict[int, Dict[str, float]] = {}
        for row in self.metrics_rows():  # before the record began (an older run resumed)
            found = {k: v for k, v in row.items()
                     if "/" in k and k.split("/", 1)[0] in EVAL_TASKS}
            if found and (first is None or int(row["iteration"]) < first):
                out.setdefault(int(row["iteration"]), {}).update(found)
        for rec in records:
            out[rec["iteration"]] = dict(rec["metrics"])
        return dict(sorted(out.items()))

    def last_iteration(self) -> Optional[int]:
        """The last training iteration ``metrics.json`` logged, or None."""
        return max((int(r["iteration"]) for r in self.metrics_rows() if "total_loss" in r),
                   default=None)

    def load_checkpoint(self, name: str) -> dict:
        """
        The checkpoint ``name`` (e.g. ``model_best.pth``), checked against its sha256 sidecar
        when it has one, then loaded safely (``weights_only``; needs torch).

        Raises:
            ArtifactError: it is missing, or does not match its sidecar.
            UnsafeArtifactError: it holds anything but tensors and plain data.
        """
        if self._folder.stat(name) is None:
            raise ArtifactError(f"{self.where(name)} does not exist.")
        expected = _sidecar(self._folder, name)
        with self._folder.local(name) as path:
            if expected is not None and sha256_file(path) != expected:
                raise ArtifactError(f"{self.where(name)} does not match its sha256 sidecar; "
                                    "it was damaged after it was written.")
            return safe_torch_load(path)

    def best_record(self) -> Optional[dict]:
        """``best.json`` (which evaluation ``model_best.pth`` is), or None."""
        try:
            record = json.loads(self._text(BEST_RECORD) or "null")
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    def persist_options(self) -> dict:
        """The run's d2persist options (``persist.yaml``; {} if it has none)."""
        return _persist_options(self._folder)

    def config(self) -> Optional[dict]:
        """The run's or the bundle's config, loaded safely; None if it has none."""
        name = CONFIG_NAME
        if self.kind == "bundle":
            name = self.manifest().get("config", CONFIG_NAME)
        data = self._folder.read(name)
        if data is None:
            return None
        return safe_yaml_loads(data, where=self.where(name))

    def classes(self) -> Optional[list]:
        """The training dataset's class names (``thing_classes``), if recorded."""
        if self.kind == "bundle":
            return (self.manifest().get("metadata") or {}).get("thing_classes")
        try:
            meta = json.loads(self._text(METADATA_NAME) or "null")
        except ValueError:
            return None
        return meta.get("thing_classes") if isinstance(meta, dict) else None

    def checkpoints(self) -> List[CheckpointEntry]:
        """Every checkpoint, newest first (``model_final.pth``, periodic ones, then the best)."""
        names = _checkpoint_names(self._folder.names()) + [BEST_NAME]
        stats = {n: s for n in names for s in [self._folder.stat(n)] if s is not None}
        last, best = self.last_checkpoint(), self.best_record() or {}
        final_it = self.last_iteration()
        evaluations = self.evaluations()
        if self.remote:  # objects have no hard links: the same sha256 is the same checkpoint
            stats = self._identities_by_sidecar(stats, best)
        by_identity: Dict[Any, List[str]] = {}
        for n, s in stats.items():
            if s[2] is not None:
                by_identity.setdefault(s[2], []).append(n)
        entries = []
        for name, (size, mtime, identity) in stats.items():
            it = checkpoint_iteration(name)
            twins = [n for n in by_identity.get(identity, []) if n != name] if identity else []
            if it is None:  # a hard link to a periodic checkpoint tells its iteration
                it = next((checkpoint_iteration(n) for n in twins
                           if checkpoint_iteration(n) is not None), None)
            if it is None and name == BEST_NAME and isinstance(best.get("iteration"), int):
                it = best["iteration"]
            if it is None and name == FINAL_NAME:
                it = final_it
            markers = [m for m, hit in (
                ("last", last in [name] + twins), ("best", BEST_NAME in [name] + twins),
                ("final", FINAL_NAME in [name] + twins)) if hit]
            metrics = {}
            if it is not None:  # after_train's evaluation is stored under MAX_ITER (it + 1)
                metrics = evaluations.get(it) or (
                    evaluations.get(it + 1, {}) if "final" in markers else {})
            entries.append(CheckpointEntry(name, it, size, mtime, markers, metrics))
        return entries

    def _identities_by_sidecar(self, stats, best):
        """
        ``stats`` with the sidecar's sha256 as the identity of the names that can be second
        names (``model_final.pth``, ``model_best.pth``) and of the checkpoints they can be:
        the newest periodic one and the one of best.json's iteration (a few small reads).
        """
        periodic = [n for n in stats if checkpoint_iteration(n) is not None]
        it = best.get("iteration")
        names = {FINAL_NAME, BEST_NAME, *periodic[:1],
                 checkpoint_name(it) if isinstance(it, int) and it >= 0 else FINAL_NAME}
        out = dict(stats)
        for n in names & set(stats):
            digest = _sidecar(self._folder, n)
            if digest is not None:
                out[n] = stats[n][:2] + (("sha256", digest),)
        return out

    def _export_folder(self, lenient: bool = False) -> Optional[_Folder]:
        """
        The bundle's folder, or None. A damaged ``persist.yaml`` (which names it) raises, or
        with ``lenient`` (:meth:`verify`, which names the damage) gives the default folder.
        """
        if self.kind == "bundle":
            return self._folder
        try:
            name = self.persist_options().get("EXPORT_DIR", DEFAULT_EXPORT_DIR)
        except UnsafeArtifactError:
            raise  # a hostile file is refused loudly, never passed over
        except ArtifactError:
            if not lenient:
                raise
            name = DEFAULT_EXPORT_DIR
        try:
            folder = self._folder.child(name)
        except UnsafeArtifactError:
            return None
        return folder if folder.isdir() else None

    def export_dir(self) -> Optional[str]:
        """The bundle folder: the view itself, or the run's export folder if it exists."""
        folder = self._export_folder()
        return folder.path if folder is not None else None

    def manifest(self) -> dict:
        """The bundle's manifest, format checked, files not hashed (see :meth:`verify`)."""
        folder = self._export_folder()
        if folder is None:
            raise ArtifactError(f"{self.path} has no export bundle.")
        return _parse_manifest(folder, folder.read(MANIFEST_NAME))

    def unhashed_problems(self, manifest: Optional[dict] = None) -> List[Problem]:
        """
        The bundle's files that its manifest gives no sha256, or that are missing or not of the
        size it gives (nothing hashed or downloaded: what a bundle at a URL is checked by before
        its nodes download it). ``manifest``: the bundle's, if already read.
        """
        folder = self._export_folder()
        if folder is None:
            raise ArtifactError(f"{self.path} has no export bundle.")
        files = (manifest or self.manifest())["files"]
        where = folder.where(MANIFEST_NAME)
        problems = [Problem(where, INCOMPLETE, f"{where} gives {n} no sha256: the bundle cannot "
                                               "be verified.")
                    for n, e in files.items() if not isinstance(e.get("sha256"), str)
                    or len(e["sha256"]) != 64]
        found = (_bundle_file_problem(folder, n, e, hashed=False) for n, e in files.items())
        return problems + [p for p in found if p is not None]

    def export(self) -> Optional[dict]:
        """
        The bundle's summary: ``folder``, ``complete``, ``formats``, ``source``, ``iteration``,
        ``evaluation`` (the manifest's ``failed`` and per-backend box / mask AP), or, where its
        manifest is missing or does not read, ``folder``, ``complete`` False and ``problem`` (a
        sentence; ``folder`` None where a damaged ``persist.yaml`` hides it); None without one.
        """
        try:
            folder = self._export_folder()
        except UnsafeArtifactError:
            raise
        except ArtifactError as e:  # a damaged persist.yaml: where the export is is unknown
            return {"folder": None, "complete": False, "problem": str(e)}
        if folder is None:
            return None
        try:
            manifest = self.manifest()
        except ArtifactError as e:  # none yet (an export under way), or a damaged one
            return {"folder": folder.path, "complete": False, "problem": str(e)}
        files = manifest.get("files") or {}
        formats = [m.format for m in MODEL_FILES
                   if (manifest.get(m.entry) if m is PYTORCH else m.file) in files]
        entry = manifest.get("evaluation") or None
        evaluation = None
        if isinstance(entry, dict):
            evaluation = {"dataset": entry.get("dataset"), "failed": entry.get("failed", []),
                          "backends": {b: {k: v for k, v in m.items() if k in (
                              "bbox/AP", "segm/AP")} for b, m in entry.get(
                              "backends", {}).items()}}
        return {"folder": folder.path, "complete": True, "formats": formats,
                "source": manifest.get("source"), "iteration": manifest.get("iteration"),
                "evaluation": evaluation}

    def mirror(self) -> Optional[str]:
        """The run's configured mirror URL (PERSIST.MIRROR), or None."""
        if self.kind != "run":
            return None
        try:
            return self.persist_options().get("MIRROR") or None
        except UnsafeArtifactError:
            raise
        except ArtifactError:  # a damaged persist.yaml (verify says so): no mirror known
            return None

    def mirror_state(self) -> Optional[dict]:
        """
        How the run's mirror compares with this folder (listings only, nothing hashed):
        ``url``, ``in_step`` (it holds every checkpoint here, and its ``last_checkpoint`` names
        the same one), ``missing`` (checkpoints it lacks), ``last_checkpoint`` (its pointer),
        ``error`` (why it could not be read). None without a mirror, or for a remote view.
        """
        url = self.mirror()
        if url is None or self.remote:
            return None
        state = {"url": url, "in_step": False, "missing": [], "last_checkpoint": None,
                 "error": None}
        try:
            there = RunView(url, "run")
            names = set(there.names())
            state["last_checkpoint"] = there.last_checkpoint()
        except Exception as e:  # noqa: BLE001 (fsspec backends raise many kinds)
            state["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            return state
        state["missing"] = [n for n in self.checkpoint_names() + [BEST_NAME]
                            if n not in names and self._folder.stat(n) is not None]
        state["in_step"] = (not state["missing"]
                            and state["last_checkpoint"] == self.last_checkpoint())
        return state

    # -- verification ------------------------------------------------------------------------
    def verify(self, progress: bool = False, workers: Optional[int] = None
               ) -> Tuple[List[Problem], List[str]]:
        """
        Check everything the folder holds. Files are hashed in parallel (hashlib releases the
        GIL), the bigger ones first. A run still training is checked as it was when this began:
        ``last_checkpoint`` as read then, and a checkpoint that the run's retention removed
        meanwhile is a note, not damage.

        Args:
            progress (bool): show a progress bar (bytes hashed) when there is much to hash.
            workers (int or None): hashing threads (default: the CPU count, at most 8).

        Returns:
            tuple: ``(problems, notes)``: one :class:`~d2persist.artifacts.problems.Problem` per
            damaged, missing or inconsistent file, and one sentence per thing that could not be
            checked because the run never had it.
        """
        problems, notes, jobs = [], [], []
        checks = []  # (checkpoint, its sidecar's sha256), in the order their lines are reported
        last, entries = None, []
        if self.kind == "run":
            last = self.last_checkpoint()  # (before the listing: the file it names is listed)
            entries = self.checkpoints()
            for e in entries:
                expected = _sidecar(self._folder, e.name)
                if expected is not None:
                    jobs.append((self._folder, e.name, e.size))
                checks.append((e.name, expected))
        bundle = self._export_folder(lenient=True)  # (a damaged persist.yaml: a problem)
        manifest, bundle_problem = None, None
        if bundle is not None:
            try:
                manifest = _parse_manifest(bundle, bundle.read(MANIFEST_NAME))
            except ArtifactError as e:
                where = bundle.where(MANIFEST_NAME)
                if bundle.read(MANIFEST_NAME) is None:
                    bundle_problem = Problem(where, INCOMPLETE, f"{bundle.path} has no "
                                             f"{MANIFEST_NAME}: an incomplete export.")
                else:
                    bundle_problem = Problem(where, DAMAGED, str(e))
            else:
                for name, entry in manifest["files"].items():
                    sub, base, _ = _bundle_file(bundle, name)
                    st = sub.stat(base)
                    if st is not None and st[0] == entry.get("size"):
                        jobs.append((sub, base, entry.get("size") or 0))
        digests = self._hash(jobs, progress, workers)
        good = set()
        unsidecarred, unchecked = [], []
        for name, expected in checks:
            if not self._folder.exists_now(name):  # listed, and removed since
                notes.append(f"{self.where(name)} was removed while this ran (a run still "
                             "training keeps its newest checkpoints): not checked.")
                good.add(name)  # not known to be damaged
                continue
            try:
                why = self._checkpoint_problem(name, expected, digests)
            except ImportError:  # a stock checkpoint, and no torch to load it with
                unchecked.append(name)
                good.add(name)  # not known to be damaged
                continue
            if expected is None:
                unsidecarred.append(name)
            if why is None:
                good.add(name)
            else:
                problems.append(Problem(self.where(name), DAMAGED, f"{self.where(name)}: {why}."))
        if unchecked:
            notes.append(f"torch is not installed: {len(unchecked)} checkpoint(s) without a "
                         f".sha256 sidecar could not be checked ({', '.join(unchecked[:3])}).")
        if self.kind == "run":
            self._verify_run(entries, last, good, unsidecarred, problems, notes)
        if bundle_problem is not None:
            problems.append(bundle_problem)
        if manifest is not None:
            self._verify_bundle(bundle, manifest, digests, problems, notes)
        return problems, notes

    @staticmethod
    def _hash(jobs, progress, workers):
        """Where each job's file is -> its sha256 (None: unreadable); largest files first."""
        if not jobs:
            return {}
        bar, lock = None, threading.Lock()

        def on_chunk(n):
            with lock:
                bar.update(n)

        def one(job):
            folder, name, _ = job
            try:
                return folder.sha256(name, on_chunk if bar is not None else None)
            except (OSError, ArtifactError):  # reported as a file that cannot be read
                return None

        # second names of one file (hard links: model_final.pth, model_best.pth) hashed once
        unique, same_as = {}, {}
        for job in sorted(jobs, key=lambda j: -j[2]):
            st = job[0].stat(job[1])
            key = st[2] if st is not None and st[2] is not None else job[0].where(job[1])
            if key in unique:
                same_as[job[0].where(job[1])] = unique[key][0].where(unique[key][1])
            else:
                unique[key] = job
        order = list(unique.values())
        total = sum(size for _, _, size in order)
        if progress and total >= _PROGRESS_BYTES:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc="verify")
        workers = workers or min(8, os.cpu_count() or 1)
        try:
            with ThreadPoolExecutor(max_workers=max(1, min(workers, len(order)))) as pool:
                results = list(pool.map(one, order))
        finally:
            if bar is not None:
                bar.close()
        digests = {f.where(n): d for (f, n, _), d in zip(order, results)}
        digests.update({link: digests[first] for link, first in same_as.items()})
        return digests

    def _checkpoint_problem(self, name, expected, digests):
        if self._folder.stat(name) is None:
            return "it does not exist"
        if expected is not None:
            actual = digests.get(self.where(name))
            if actual is None:
                return "it cannot be read"
            if actual != expected and _sidecar(self._folder, name) != expected:
                # replaced while we hashed (a run still training rewrites model_best.pth):
                # compare the file as it is now with its sidecar as it is now
                expected, actual = _sidecar(self._folder, name), self._folder.sha256(name)
            return sidecar_problem(name, expected, actual)
        try:
            with self._folder.local(name) as path:  # a stock checkpoint: load it safely
                return _safely_loadable(path)
        except ArtifactError as e:  # a hostile pickle, or a download that failed
            return str(e)

    def _verify_run(self, entries, last, good, unsidecarred, problems, notes):
        models = [m.file for m in MODEL_FILES if self._folder.stat(m.file) is not None]
        if models:  # an export's files in the folder itself, and no manifest names them
            problems.append(Problem(self.where(models[0]), INCOMPLETE, (
                f"{self.path} holds {', '.join(models)} but no {MANIFEST_NAME}: an export that "
                "never finished, or lost its manifest; nothing can predict from it.")))
        if unsidecarred:
            notes.append(f"{len(unsidecarred)} checkpoint(s) without a .sha256 sidecar (written "
                         "by stock detectron2): verified by loading them safely.")
        if last is None:
            if entries:
                notes.append(f"No {LAST_CHECKPOINT}: nothing names the checkpoint to resume from.")
        elif last not in good:
            state = "does not verify" if self._folder.stat(last) is not None else "is missing"
            problems.append(Problem(self.where(LAST_CHECKPOINT), INCONSISTENT,
                                    f"{self.where(LAST_CHECKPOINT)} names {last}, which {state}."))
        record = self.best_record()
        if record is not None or BEST_NAME in good:
            self._verify_best(record, good, problems, notes)
        data = self._folder.read(CONFIG_NAME)
        if data is not None:
            try:
                safe_yaml_loads(data, where=self.where(CONFIG_NAME))
            except UnsafeArtifactError as e:
                if self._folder.stat(CONFIG_PICKLE) is None:
                    problems.append(Problem(self.where(CONFIG_NAME), DAMAGED,
                                            f"{self.where(CONFIG_NAME)}: {e}"))
                else:  # a LazyConfig with objects YAML cannot hold, saved as detectron2 does
                    notes.append(f"{self.where(CONFIG_NAME)} holds Python objects (LazyConfig."
                                 f"save wrote {CONFIG_NAME}.pkl beside it): not loaded, so not "
                                 "checked; such a run exports nothing.")
            except ArtifactError as e:
                problems.append(Problem(self.where(CONFIG_NAME), DAMAGED,
                                        f"{self.where(CONFIG_NAME)}: {e}"))
        else:
            notes.append(f"No {CONFIG_NAME}: the run's config could not be checked.")
        try:
            self.persist_options()
        except ArtifactError as e:
            problems.append(Problem(self.where(PERSIST_FILE), DAMAGED, str(e)))

    def _verify_best(self, record, good, problems, notes):
        where = self.where(BEST_NAME)
        if record is None:
            problems.append(Problem(where, INCONSISTENT,
                                    f"{where} has no {BEST_RECORD} saying which evaluation it is."))
            return
        if self._folder.stat(BEST_NAME) is None:
            problems.append(Problem(where, MISSING, f"{self.where(BEST_RECORD)} records a best "
                                    f"model, but {BEST_NAME} is missing."))
            return
        if BEST_NAME not in good:
            return  # reported as a damaged checkpoint already
        it = record.get("iteration")
        twin = checkpoint_name(it) if isinstance(it, int) and it >= 0 else None
        best_sha = _sidecar(self._folder, BEST_NAME)
        if twin in good and best_sha is not None and best_sha == _sidecar(self._folder, twin):
            return  # the same bytes as the periodic checkpoint of that iteration
        try:
            with self._folder.local(BEST_NAME) as path:
                held = safe_torch_load(path).get("iteration")
        except ImportError:
            notes.append(f"torch is not installed: whether {BEST_NAME} holds the iteration "
                         f"{BEST_RECORD} records was not checked.")
            return
        except (ArtifactError, AttributeError):
            return
        if held != it:
            problems.append(Problem(self.where(BEST_RECORD), INCONSISTENT,
                                    f"{self.where(BEST_RECORD)} says iteration {it}, but "
                                    f"{BEST_NAME} holds iteration {held}."))

    def _verify_bundle(self, folder, manifest, digests, problems, notes):
        damaged = set()
        for name, entry in manifest["files"].items():  # one line per damaged file
            sub, base, where = _bundle_file(folder, name)
            if where in digests and digests[where] is None:
                problem = Problem(where, DAMAGED, f"Bundle file {where} cannot be read.")
            else:  # hashed above unless it is missing or has the wrong size
                problem = _bundle_file_problem(folder, name, entry, digests.get(where))
            if problem:
                problems.append(problem)
                damaged.add(name)
        for name in (ONNX_NAME, ONNX_INT8_NAME):
            if name not in manifest["files"] or name in damaged:
                continue
            try:
                import onnxruntime as ort
            except ImportError:
                notes.append(f"onnxruntime is not installed: {name} was checked against its "
                             "sha256 only.")
                continue
            try:
                with folder.local(name) as path:  # (at a URL: downloaded, checked by sha256)
                    try:
                        ort.InferenceSession(path, providers=["CPUExecutionProvider"])
                    except Exception as e:  # noqa: BLE001 (ONNX Runtime raises its own kinds)
                        problems.append(Problem(folder.where(name), DAMAGED,
                                                f"{folder.where(name)} does not open in ONNX "
                                                f"Runtime ({type(e).__name__})."))
            except (ArtifactError, OSError) as e:  # the download, not the file: not damage
                notes.append(f"{folder.where(name)} was checked against its sha256 only, not "
                             f"opened in ONNX Runtime ({str(e).rstrip('.')}).")


def open_view(path: str) -> RunView:
    """
    The view of ``path`` (a folder, or an fsspec URL such as a run's ``PERSIST.MIRROR``): a
    bundle (it holds ``manifest.json``) or a run folder (checkpoints, ``last_checkpoint``,
    ``config.yaml`` or ``metrics.json``).

    Raises:
        ArtifactError: ``path`` cannot be read (a URL whose store does not answer).
        D2PersistError: ``path`` is neither, in one sentence.
    """
    folder = _folder(path)
    try:
        names = folder.names()
        exists = folder.isdir()
    except Exception as e:  # noqa: BLE001 (fsspec backends raise many kinds)
        raise ArtifactError(f"Cannot read {path} ({type(e).__name__}: {e}).") from None
    if not exists:
        if folder.remote and getattr(folder, "is_file", False):
            raise D2PersistError(f"{path} is a file, not a folder (a run's mirror or an export "
                                 "bundle).")
        if folder.remote:
            raise D2PersistError(f"{path} holds nothing (a run's mirror or an export bundle).")
        if not os.path.lexists(path):
            raise D2PersistError(f"{path} does not exist (a run's OUTPUT_DIR or an export "
                                 "bundle).")
        raise D2PersistError(f"{path} is not a folder (a run's OUTPUT_DIR or an export bundle).")
    if MANIFEST_NAME in names:
        return RunView(path, "bundle", source=folder)
    markers = (LAST_CHECKPOINT, CONFIG_NAME, METRICS_NAME, BEST_RECORD)
    if _checkpoint_names(names) or any(m in names for m in markers):
        return RunView(path, "run", source=folder)
    raise D2PersistError(f"{path} is neither a run folder (no checkpoints, {LAST_CHECKPOINT}, "
                         f"{CONFIG_NAME} or {METRICS_NAME}) nor an export bundle (no "
                         f"{MANIFEST_NAME}).")


def find_newest_valid(folder: str) -> Optional[str]:
    """
    The newest checkpoint in ``folder`` that verifies, warning about each newer one that does not.

    ``last_checkpoint``'s target is tried first, then every other checkpoint newest first.

    Returns:
        str or None: the path, or None if no checkpoint verifies.
    """
    found = newest_valid_noted(folder)
    return found[0] if found is not None else None


def newest_valid_noted(folder: str, sha256: Optional[str] = None
                       ) -> Optional[Tuple[str, Any, Optional[str]]]:
    """
    :func:`find_newest_valid`, with what a loader compares once it has loaded the file:
    ``(path, its file identity from before it was verified, the sha256 of its sidecar, or
    None)``; None if no checkpoint verifies. With ``sha256``, the newest checkpoint whose
    sidecar gives it (the one a Ray job's driver described, while the run writes newer ones).
    """
    for name in RunView(folder, "run").resume_candidates():
        path = os.path.join(folder, name)
        identity, expected = file_identity(path), read_sidecar(path)
        if sha256 is not None and expected != sha256 and (
                expected is not None or not _hashes_to(path, sha256)):
            continue  # (without a sidecar, a stock checkpoint: its hash is compared)
        problem = verify_checkpoint(path)
        if problem is None:
            return path, identity, expected
        logger.warning(
            "Checkpoint %s is not usable (%s); falling back to an older one.", path, problem
        )
    return None


def _hashes_to(path: str, sha256: str) -> bool:
    try:
        return sha256_file(path) == sha256
    except OSError:  # removed meanwhile (retention)
        return False


def list_checkpoints(folder: str) -> List[str]:
    """
    Checkpoints in ``folder``, newest first: ``model_final.pth``, then periodic ones by iteration
    (:meth:`RunView.checkpoint_names`).

    Returns:
        list[str]: file names.
    """
    return RunView(folder, "run").checkpoint_names()
