"""
How bytes from an artifact come back: checkpoints with ``torch.load(weights_only=True)``, YAML
with ``yaml.safe_load`` (plus detectron2's ``ShapeSpec`` tag as plain data), JSON. None of them
executes code.
"""

import json
import logging
import os
import pickle
import zipfile
from typing import IO, Any, Optional, Union

import yaml

from ..errors import ArtifactError, UnsafeArtifactError

__all__ = ["safe_torch_load", "safe_yaml_load", "safe_yaml_loads", "SafeLoader", "read_json"]

logger = logging.getLogger(__name__)


def safe_torch_load(path: str) -> Any:
    """
    Load a torch file without executing code from it (``weights_only=True``).

    Raises:
        UnsafeArtifactError: the file holds Python objects that only a full unpickler could
            build: it would run code if loaded the unsafe way.
        ArtifactError: the file is missing, truncated or not a torch file.
    """
    import torch

    if not os.path.isfile(path):
        raise ArtifactError(f"Checkpoint {path} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise UnsafeArtifactError(
            f"Refusing to load {path}: it holds Python objects beyond tensors and plain data, "
            f"which could run code when unpickled{(' (' + detail.strip() + ')') if detail else ''}."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(
            f"Checkpoint {path} is truncated or not a torch file ({msg})."
        ) from None


class SafeLoader(yaml.SafeLoader):
    """
    ``yaml.SafeLoader`` that also builds detectron2's ``ShapeSpec`` (a record of four ints),
    which ``LazyConfig.save`` writes as a python tag in detectron2's own model configs (a dict
    of its fields where detectron2 is not installed). Every other python tag is refused.
    """


def _construct_shape_spec(loader, node):
    fields = loader.construct_mapping(node)
    if set(fields) - {"channels", "height", "width", "stride"} or not all(
        v is None or isinstance(v, int) for v in fields.values()
    ):
        raise yaml.constructor.ConstructorError(None, None, "a ShapeSpec of other fields",
                                                node.start_mark)
    try:
        from detectron2.layers import ShapeSpec
    except ImportError:  # ls, verify, diff, ONNX Runtime where detectron2 is not: its fields
        return dict(fields)
    return ShapeSpec(**fields)


SafeLoader.add_constructor(
    "tag:yaml.org,2002:python/object:detectron2.layers.shape_spec.ShapeSpec",
    _construct_shape_spec,
)


def safe_yaml_loads(text: Union[str, bytes, IO[str]], where: Optional[str] = None) -> Any:
    """
    Parse YAML text with :class:`SafeLoader`.

    Args:
        where (str or None): where the text comes from: then errors are raised as
            :func:`safe_yaml_load` raises them, naming it; else YAML's own errors propagate.
    """
    if where is None:
        return yaml.load(text, Loader=SafeLoader)
    try:
        return yaml.load(text, Loader=SafeLoader)
    except yaml.constructor.ConstructorError as e:
        tag = getattr(e, "problem", "") or str(e)
        raise UnsafeArtifactError(
            f"Refusing to load {where}: it carries a YAML tag that would construct a Python "
            f"object ({tag.strip()})."
        ) from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ArtifactError(f"Config file {where} is not valid YAML ({type(e).__name__}).") \
            from None


def safe_yaml_load(path: str) -> Any:
    """
    Read a YAML file with :class:`SafeLoader`: python tags are refused, never constructed.

    Raises:
        UnsafeArtifactError: the file carries a tag that would construct a Python object.
        ArtifactError: the file is missing or is not valid YAML.
    """
    try:
        with open(path, "r", encoding="utf-8") as f:
            return safe_yaml_loads(f, where=path)
    except FileNotFoundError:
        raise ArtifactError(f"Config file {path} does not exist.") from None
    except UnicodeDecodeError as e:
        raise ArtifactError(f"Config file {path} is not valid YAML ({type(e).__name__}).") \
            from None


def read_json(path: str) -> Any:
    """Read a JSON file; a missing or malformed file is an :class:`ArtifactError`."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ArtifactError(f"{path} does not exist.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}).") from None
