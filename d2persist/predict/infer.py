"""What ``tools/infer_single.py`` does: predict on image files, write visualizations and JSON."""

import collections
import json
import logging
import os
from typing import Any, List, Optional, Sequence, Set, Tuple

from ..errors import InputImageError, OutputPathError
from ..files.atomic import check_output_file, check_output_folder, write_bytes, write_text
from ..layout import DEFAULT_MIN_SCORE
from .images import check_image_file, encode_png

__all__ = ["IMAGE_EXTENSIONS", "collect_images", "output_paths", "check_outputs",
           "predict_files", "json_text"]

logger = logging.getLogger(__name__)

#: File endings taken as images when ``--image`` names a folder.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def collect_images(paths: Sequence[str]) -> Tuple[List[str], bool]:
    """
    Expand ``--image`` arguments: files as given, folders into their image files (sorted).

    Returns:
        tuple[list[str], bool]: the image files, and whether outputs must be folders (more than
        one image, or a folder was given).

    Raises:
        InputImageError: a path does not exist, or a folder holds no image.
    """
    files, many = [], len(paths) > 1
    for path in paths:
        if os.path.isdir(path):
            many = True
            found = sorted(
                os.path.join(path, n)
                for n in os.listdir(path)
                if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, n))
            )
            if not found:
                raise InputImageError(
                    f"Folder {path} holds no image ({', '.join(IMAGE_EXTENSIONS)})."
                )
            files += found
        elif os.path.exists(path):
            files.append(path)
        else:
            raise InputImageError(f"Image {path} does not exist.")
    return files, many


def output_paths(image: str, target: Optional[str], many: bool, suffix: str) -> Optional[str]:
    """Where to write the output of ``image``: ``target`` itself, or a file in folder ``target``."""
    if target is None:
        return None
    if many or os.path.isdir(target):
        stem = os.path.splitext(os.path.basename(image))[0]
        return os.path.join(target, stem + suffix)
    return target


def predict_files(
    predictor: Any,
    images: List[str],
    output: Optional[str] = None,
    json_out: Optional[str] = None,
    min_score: float = DEFAULT_MIN_SCORE,
    many: bool = False,
    progress: bool = True,
) -> List[dict]:
    """
    Predict on image files and write each one's visualization and JSON.

    Every file is checked (PIL's ``verify``: missing, empty, not an image, most truncations)
    before any model work, so a bad file usually fails the run before any output is written;
    damage only a full decode finds fails it at that image.

    Args:
        predictor: from :func:`d2persist.load_predictor` (either backend).
        images (list[str]): image files.
        output (str): visualization file, or folder (``many``), or None.
        json_out (str): JSON file, or folder (``many``), or None.
        min_score (float): instances below this score are left out of both outputs.
        many (bool): outputs are folders, one file per image.
        progress (bool): show a tqdm progress bar.

    Returns:
        list[dict]: the JSON data of each image.
    """
    for image in images:
        check_image_file(image)
    check_outputs(images, output, json_out, many)
    for target in (output, json_out):
        if target and many:
            os.makedirs(target, exist_ok=True)
    meta = predictor.visualizer_metadata() if output else None
    results = []
    bar = images
    if progress and len(images) > 1:  # tqdm's import is a twentieth of a cold start
        from tqdm import tqdm

        bar = tqdm(images, unit="image")
    for image in bar:
        pred = predictor(image)
        data = pred.to_json(image_name=image, min_score=min_score)
        results.append(data)
        vis_path = output_paths(image, output, many, ".png")
        if vis_path:
            _makedirs_for(vis_path)
            write_bytes(vis_path, encode_png(pred.draw(meta, min_score=min_score)))
        json_path = output_paths(image, json_out, many, ".json")
        if json_path:
            _makedirs_for(json_path)
            write_text(json_path, json_text(data))
    return results


def check_outputs(images: Sequence[str], output: Optional[str], json_out: Optional[str],
                  many: bool) -> None:
    """
    Refuse, before any model work, outputs that cannot be written as asked: images whose outputs
    would share a name, a folder where a file goes (or the reverse), a file where a folder
    above one goes, an output that is one of the input images (it would be overwritten by the
    drawing), or the picture and the JSON of an image on one file.

    Args:
        images (list[str]): the input image files.
        output (str): the pictures' file, or folder (``many``), or None.
        json_out (str): the JSON file, or folder (``many``), or None.
        many (bool): outputs are folders, one file per image.

    Raises:
        InputImageError: several images of one name (other folder or ending), whose outputs
            would overwrite each other.
        OutputPathError: the first such output, in one sentence.
    """
    if many:
        stems = collections.Counter(os.path.splitext(os.path.basename(p))[0] for p in images)
        twins = sorted(s for s, n in stems.items() if n > 1)
        if twins and (output or json_out):
            raise InputImageError(
                f"Several images are named {twins[0]!r} (other folder or ending): their outputs "
                "would overwrite each other; predict on them separately."
            )
    inputs = {_file_id(p): p for p in images}  # (links and case-insensitive names alike)
    written: Set[str] = set()
    for target, suffix in ((output, ".png"), (json_out, ".json")):
        if not target:
            continue
        if many:
            check_output_folder(target)
        for image in images:
            path = output_paths(image, target, many, suffix)
            assert path is not None
            check_output_file(path)
            same = inputs.get(_file_id(path)) if os.path.exists(path) else None
            if same is not None:
                raise OutputPathError(
                    f"Output {path} is the input image {same}: writing it would "
                    "replace the image; write the outputs elsewhere.")
            real = os.path.realpath(path)
            if real in written:
                raise OutputPathError(f"Two outputs would be written to {path}: give the "
                                      "picture and the JSON different paths.")
            written.add(real)


def _file_id(path: str) -> Tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def json_text(data: dict) -> str:
    """The text of a prediction's JSON file, as ``infer_single`` and ``predict`` write it."""
    return json.dumps(data, indent=2) + "\n"


def _makedirs_for(path):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
