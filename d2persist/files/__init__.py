"""
``files``: how bytes travel. Atomic writes (temporary file, fsync, ``os.replace``), sha256,
a file's identity (the file loaded is the file verified), safe loading (no code runs), the run
lock (one process writes a run folder), the background writer, the fsspec mirror, and a cache
that stays bounded. A guarantee about files is made here and nowhere else. Imports neither
torch nor detectron2.
"""

from .atomic import (
    atomic_path,
    check_output_file,
    check_unchanged,
    check_output_folder,
    file_identity,
    fsync_dir,
    remove_temp_files,
    resolve_inside,
    sha256_file,
    sha256_stream,
    torch_save,
    write_bytes,
    write_json,
    write_text,
)
from .cache import discard, note_used, remove_unused
from .lock import (
    lock_run_folder,
    note_run_started,
    read_lock_holder,
    restarted_run_started,
    unlock_run_folder,
)
from .mirror import Mirror, Uploader, check_mirror, is_url
from .safe_load import SafeLoader, read_json, safe_torch_load, safe_yaml_load, safe_yaml_loads
from .writer import BackgroundWriter

__all__ = [
    "atomic_path",
    "check_output_file",
    "check_output_folder",
    "check_unchanged",
    "file_identity",
    "fsync_dir",
    "remove_temp_files",
    "resolve_inside",
    "sha256_file",
    "sha256_stream",
    "torch_save",
    "write_bytes",
    "write_json",
    "write_text",
    "discard",
    "note_used",
    "remove_unused",
    "lock_run_folder",
    "note_run_started",
    "read_lock_holder",
    "restarted_run_started",
    "unlock_run_folder",
    "Mirror",
    "check_mirror",
    "Uploader",
    "is_url",
    "SafeLoader",
    "read_json",
    "safe_torch_load",
    "safe_yaml_load",
    "safe_yaml_loads",
    "BackgroundWriter",
]
