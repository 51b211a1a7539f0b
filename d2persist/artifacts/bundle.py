"""
An export bundle's manifest, read and checked: its format, the files it names and their
sha256, and the PERSIST options a run recorded.
"""

import importlib
import json
import logging
import os
import sys
from typing import Any, Dict, Optional, Sequence, Union

from ..errors import ArtifactError
from ..files.atomic import resolve_inside
from ..files.safe_load import safe_yaml_loads
from ..layout import DEFAULT_EXPORT_DIR, MANIFEST_NAME, PERSIST_FILE
from .folders import _Folder, _LocalFolder, _remote_name
from .problems import DAMAGED, MISSING, Problem

__all__ = ["FORMAT", "LOADED", "read_manifest", "persist_options_of_run", "find_bundle",
           "check_artifacts_folder", "software_versions"]

logger = logging.getLogger(__name__)

#: Identifies a d2persist manifest, with its version.
FORMAT: Dict[str, Any] = {"name": "d2persist-export", "version": 1}
#: ``read_manifest(only=LOADED)``: check just the config and weights files the bundle names.
LOADED = "config and weights"


def software_versions(required: Sequence[str] = (), imported: Sequence[str] = ()
                      ) -> Dict[str, str]:
    """
    The ``versions`` a manifest or a prediction job records.

    Args:
        required (list[str]): packages imported here, each recorded.
        imported (list[str]): packages recorded where this process imported them already (a
            torch-free process stays torch-free).

    Returns:
        dict: d2persist's version, then each package's, in that order.
    """
    from .. import __version__

    versions = {"d2persist": __version__}
    for name in required:
        versions[name] = importlib.import_module(name).__version__
    for name in imported:
        version = getattr(sys.modules.get(name), "__version__", None)
        if version:
            versions[name] = version
    return versions


# -- the bundle's manifest and the run's options ----------------------------------------------

def _parse_manifest(folder: _Folder, text: Optional[bytes]) -> dict:
    where = folder.where(MANIFEST_NAME)
    if text is None:
        raise ArtifactError(f"{folder.path} is not a complete export: it has no {MANIFEST_NAME}.")
    try:
        manifest = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{where} is not valid JSON ({e}).") from None
    fmt: Any = manifest.get("format") if isinstance(manifest, dict) else None
    version = fmt.get("version") if isinstance(fmt, dict) else None
    if isinstance(version, int) and fmt.get("name") == FORMAT["name"] \
            and version > FORMAT["version"]:
        raise ArtifactError(
            f"{where} was written by a newer d2persist (format version {version}; this one "
            f"reads up to {FORMAT['version']}): read it with a newer d2persist.")
    if (not isinstance(version, int) or fmt.get("name") != FORMAT["name"]
            or version > FORMAT["version"] or not isinstance(manifest.get("input"), dict)):
        raise ArtifactError(f"{where} is not a d2persist manifest this version can read.")
    files = manifest.get("files")
    named = [manifest.get("config"), manifest.get("weights")]
    if not isinstance(files, dict) or not all(
        isinstance(n, str) and isinstance(files.get(n), dict) for n in named
    ) or not all(isinstance(e, dict) for e in files.values()):
        raise ArtifactError(f"{where} does not list the bundle's config and weights files.")
    for name in files:  # a name that leaves the bundle is refused before anything opens it
        _bundle_file(folder, name)
    return manifest


def _bundle_file(folder, name):
    """(folder holding it, its base name, where it is for messages), refusing escaping names."""
    if isinstance(folder, _LocalFolder):
        path = resolve_inside(folder.path, name)
        return _LocalFolder(os.path.dirname(path)), os.path.basename(path), path
    head, _, base = _remote_name(name, folder.path).rpartition("/")
    sub = folder.child(head) if head else folder
    return sub, base, sub.where(base)


def _bundle_file_problem(folder: _Folder, name: str, entry: dict,
                         digest: Optional[str] = None, hashed: bool = True
                         ) -> Optional[Problem]:
    """
    Why the bundle file ``name`` does not match its manifest ``entry`` (None if it does); with
    ``hashed`` False, by presence and size alone.
    """
    sub, base, where = _bundle_file(folder, name)
    st = sub.stat(base)
    if st is None:
        return Problem(where, MISSING, f"Bundle file {where} named in {MANIFEST_NAME} is missing.")
    if st[0] != entry.get("size"):
        return Problem(where, DAMAGED, f"Bundle file {where} has {st[0]} bytes, the manifest says "
                                       f"{entry.get('size')}.")
    if hashed and (digest or sub.sha256(base)) != entry.get("sha256"):
        return Problem(where, DAMAGED,
                       f"Bundle file {where} does not match its sha256 in the manifest.")
    return None


def read_manifest(export_dir: str, verify: bool = True,
                  only: Optional[Union[Sequence[str], str]] = None) -> dict:
    """
    Read and check a bundle's manifest.

    Args:
        export_dir (str): the bundle folder.
        verify (bool): check every listed file's size and sha256.
        only (list[str] or LOADED): check only these of the listed files (the ones a caller
            loads); :data:`LOADED` names the manifest's config and weights files.

    Returns:
        dict: the manifest.

    Raises:
        ArtifactError: no manifest, an unknown format, or a file that does not match.
        UnsafeArtifactError: a file name that points outside the bundle.
    """
    folder = _LocalFolder(export_dir)
    text = folder.read(MANIFEST_NAME)
    manifest = _parse_manifest(folder, text)
    if only == LOADED:
        only = [manifest["config"], manifest["weights"]]
    for name, entry in manifest["files"].items():
        if verify and (only is None or name in only):
            problem = _bundle_file_problem(folder, name, entry)
            if problem and folder.read(MANIFEST_NAME) != text:  # not damage: a new export
                raise ArtifactError(f"{export_dir} was exported again while it was being "
                                    "read (a resumed run, export_model.py): read it again.")
            if problem:
                raise ArtifactError(problem.sentence)
    return manifest


def _persist_options(folder: _Folder) -> dict:
    data = folder.read(PERSIST_FILE)
    if data is None:
        return {}
    persist = safe_yaml_loads(data, where=folder.where(PERSIST_FILE))
    options = persist.get("PERSIST") if isinstance(persist, dict) else None
    if not isinstance(options, dict):
        raise ArtifactError(f"{folder.where(PERSIST_FILE)} holds no PERSIST options.")
    return options


def persist_options_of_run(folder: str) -> dict:
    """A run's ``persist.yaml`` options ({} if it has none: a LazyConfig run written before
    d2persist wrote one for them too)."""
    return _persist_options(_LocalFolder(folder))


def check_artifacts_folder(path: str) -> None:
    """
    Refuse, in one sentence, artifacts that are not a folder: none there, or one of the
    run's or the bundle's files (a checkpoint) in its place.

    Raises:
        ArtifactError: naming ``path``.
    """
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise ArtifactError(
            f"{path} is a file, not a folder: give the folder of the training run or of the "
            f"export bundle that holds it ({os.path.dirname(path) or '.'}).")
    raise ArtifactError(f"Artifacts folder {path} does not exist.")


def find_bundle(path: str) -> Optional[str]:
    """
    The export bundle at ``path``: ``path`` itself if it holds a manifest, else the export
    folder of the run folder ``path`` if that holds one, else None.
    """
    if os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        return path
    name = persist_options_of_run(path).get("EXPORT_DIR", DEFAULT_EXPORT_DIR)
    export_dir = _LocalFolder(path).child(name).path
    return export_dir if os.path.isfile(os.path.join(export_dir, MANIFEST_NAME)) else None
