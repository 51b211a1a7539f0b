"""
Image files in and out with numpy and Pillow only: what detectron2's evaluation path does to an
image before the model (``read_image``, ``ResizeShortestEdge``), reproduced without torch or
detectron2 for the ONNX Runtime predictor; and PNG encoding for visualizations.
"""

import contextlib
import io
import os
from typing import Callable, Iterator, Optional, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InputImageError

__all__ = ["CHANNEL_ORDERS", "check_image_file", "check_image_bytes", "pil_errors",
           "read_image", "decode_image", "convert_array", "image_input", "resized_shape",
           "resize_shortest_edge", "encode_png"]

#: The channel orders an image array may come in.
CHANNEL_ORDERS = ("BGR", "RGB", "L")

_EXIF_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.FLIP_LEFT_RIGHT,
    3: Image.ROTATE_180,
    4: Image.FLIP_TOP_BOTTOM,
    5: Image.TRANSPOSE,
    6: Image.ROTATE_270,
    7: Image.TRANSVERSE,
    8: Image.ROTATE_90,
}


def check_image_file(path: str) -> None:
    """
    Check, without decoding it, that ``path`` is a whole image file.

    Raises:
        InputImageError: the file is missing, empty, not an image, or truncated.
    """
    if not os.path.isfile(path):
        raise InputImageError(f"Image {path} does not exist.")
    if os.path.getsize(path) == 0:
        raise InputImageError(f"Image {path} is empty.")
    _verify(path, path)


def check_image_bytes(data: bytes, name: str) -> None:
    """
    :func:`check_image_file` of an image file's content.

    Args:
        data (bytes): what the file holds.
        name (str): the image's path or URL, as sentences name it.

    Raises:
        InputImageError: ``data`` is empty, not an image, or truncated.
    """
    if not data:
        raise InputImageError(f"Image {name} is empty.")
    _verify(io.BytesIO(data), name)


@contextlib.contextmanager
def pil_errors(unreadable: str, corrupt: str, subject: str = "the image") -> Iterator[None]:
    """
    PIL's errors while opening or decoding an image, as one :class:`InputImageError`:
    ``unreadable`` where PIL cannot tell what the file is, a sentence on ``subject`` (e.g.
    "image PATH") where it has more pixels than PIL decodes, else ``corrupt`` and PIL's reason.
    """
    try:
        yield
    except UnidentifiedImageError:
        raise InputImageError(unreadable) from None
    except OSError as e:
        if e.errno is not None and e.filename:  # the file itself (a permission), not its bytes
            raise InputImageError(f"Cannot read image {e.filename}: {e.strerror}.") from None
        raise InputImageError(f"{corrupt} ({e}).") from None
    except Image.DecompressionBombError as e:  # not damage: more pixels than PIL decodes
        raise InputImageError(
            f"Too many pixels in {subject} for PIL ({str(e).rstrip('.')}); raise "
            "PIL.Image.MAX_IMAGE_PIXELS to read it.") from None
    except (SyntaxError, ValueError) as e:
        raise InputImageError(f"{corrupt} ({e}).") from None


def _verify(source: Union[str, io.BytesIO], name: str) -> None:
    with pil_errors(f"{name} is not an image file PIL can read.",
                    f"Image {name} is truncated or corrupt", f"image {name}"):
        try:
            with Image.open(source) as probe:
                probe.verify()
            return
        except UnidentifiedImageError:
            raise
        except (OSError, SyntaxError, ValueError):
            # verify checks what decoding does not (a PNG chunk's CRC, its IEND): refused only
            # if it does not decode either, as detectron2's read_image decodes it
            if isinstance(source, io.BytesIO):
                source.seek(0)
        with Image.open(source) as image:
            image.load()


def _apply_exif_orientation(image):
    try:
        exif = image.getexif()
    except Exception:  # as detectron2: a broken EXIF block is ignored
        return image
    method = _TRANSPOSE.get(exif.get(_EXIF_ORIENTATION)) if exif is not None else None
    return image.transpose(method) if method is not None else image


def read_image(path: str, fmt: str) -> np.ndarray:
    """
    Read an image file as ``detectron2.data.detection_utils.read_image(path, fmt)`` does: EXIF
    orientation applied, converted by PIL to ``fmt`` ("BGR", "RGB" or "L").

    Returns:
        np.ndarray: HxWxC uint8 (C = 1 for "L").

    Raises:
        InputImageError: the file is missing, not an image, truncated, or ``fmt`` is unknown.
    """
    if fmt not in ("BGR", "RGB", "L"):
        raise InputImageError(f"Input format {fmt!r} is not one of BGR, RGB, L.")
    check_image_file(path)
    with pil_errors(f"{path} is not an image file PIL can read.",
                    f"Image {path} is truncated or corrupt", f"image {path}"):
        with Image.open(path) as image:
            return _to_numpy(_apply_exif_orientation(image), fmt)


def decode_image(data: bytes, fmt: str,
                 convert: Optional[Callable[[Image.Image, str], np.ndarray]] = None
                 ) -> np.ndarray:
    """
    :func:`read_image` of an image file's content: the same pixels as reading the file (PIL
    decodes the same bytes), without a temp file. Not verified first (see
    :func:`check_image_bytes`); what does not decode still raises one sentence.

    Args:
        data (bytes): what the image file holds.
        fmt (str): "BGR", "RGB" or "L" (or any format ``convert`` takes).
        convert: ``(PIL image, fmt) -> array``, instead of this module's EXIF orientation and
            conversion (the PyTorch predictor passes detectron2's own).

    Returns:
        np.ndarray: HxWxC uint8 (C = 1 for "L"), as :func:`read_image` returns.

    Raises:
        InputImageError: ``data`` is not an image, or truncated.
    """
    if convert is None and fmt not in ("BGR", "RGB", "L"):
        raise InputImageError(f"Input format {fmt!r} is not one of BGR, RGB, L.")
    with pil_errors("The image's bytes are not an image file PIL can read.",
                    "The image's bytes are truncated or corrupt", "the image's bytes"):
        with Image.open(io.BytesIO(data)) as image:
            if convert is not None:
                return convert(image, fmt)
            return _to_numpy(_apply_exif_orientation(image), fmt)


def _to_numpy(pil, fmt):
    """``detection_utils.convert_PIL_to_numpy`` for BGR, RGB and L."""
    array = np.asarray(pil.convert("RGB" if fmt == "BGR" else fmt))
    if fmt == "L":
        return np.expand_dims(array, -1)
    return array[:, :, ::-1] if fmt == "BGR" else array


def convert_array(image: np.ndarray, channel_order: str, fmt: str) -> np.ndarray:
    """
    Convert a uint8 array in ``channel_order`` to the model's input format ``fmt``, through the
    same PIL conversion ``read_image`` applies to a file (grayscale expanded, alpha dropped).

    Raises:
        InputImageError: an unknown channel order, a dtype other than uint8, or a shape that
            the channel order cannot have.
    """
    if channel_order not in CHANNEL_ORDERS:
        raise InputImageError(
            f"channel_order must be one of {', '.join(CHANNEL_ORDERS)}, not {channel_order!r}."
        )
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise InputImageError(f"An image array must be uint8, not {image.dtype}.")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        pil = Image.fromarray(np.ascontiguousarray(image), "L")
    elif image.ndim == 3 and image.shape[2] in (3, 4) and channel_order != "L":
        if channel_order == "BGR":
            image = image[:, :, [2, 1, 0, 3][: image.shape[2]]]
        pil = Image.fromarray(np.ascontiguousarray(image), "RGB" if image.shape[2] == 3 else "RGBA")
    else:
        raise InputImageError(
            f"An image array in {channel_order} order cannot have shape {image.shape}."
        )
    return _to_numpy(pil, fmt)


def image_input(image: Union[str, "os.PathLike[str]", bytes, np.ndarray],
                channel_order: Optional[str], fmt: str,
                read: Callable[[str, str], np.ndarray] = read_image,
                decode: Callable[[bytes, str], np.ndarray] = decode_image) -> np.ndarray:
    """
    What a predictor is called with, as an HxWxC uint8 array in ``fmt``: an image file read with
    ``read(path, fmt)``, an image file's bytes decoded with ``decode(data, fmt)``, or an array
    converted from its ``channel_order`` (which must be given, so that a BGR/RGB mix-up cannot
    pass silently).
    """
    if isinstance(image, (str, os.PathLike)):
        return read(os.fspath(image), fmt)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode(bytes(image), fmt)
    if channel_order is None:
        raise InputImageError("Pass channel_order ('BGR', 'RGB' or 'L') with an image array.")
    return convert_array(image, channel_order, fmt)


def resized_shape(height: int, width: int, short: int, max_size: int) -> Tuple[int, int]:
    """``ResizeShortestEdge.get_output_shape``: the (height, width) an image is resized to."""
    size = short * 1.0
    scale = size / min(height, width)
    if height < width:
        newh, neww = size, scale * width
    else:
        newh, neww = scale * height, size
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def resize_shortest_edge(image: np.ndarray, short: int, max_size: int) -> np.ndarray:
    """
    Resize a uint8 HxWxC image as detectron2's test-time ``ResizeShortestEdge(short,
    max_size)`` does (PIL bilinear); ``short`` 0 leaves it as it is.
    """
    if not short:
        return image
    h, w = image.shape[:2]
    newh, neww = resized_shape(h, w, short, max_size)
    if min(newh, neww) < 1:  # (PIL's resize raised ValueError; detectron2's evaluation too)
        raise InputImageError(f"An image of {w}x{h} pixels cannot be resized for the model: "
                              f"at its test size ({short}, at most {max_size}) a side would be "
                              "0 pixels.")
    gray = image.ndim > 2 and image.shape[2] == 1
    pil = Image.fromarray(image[:, :, 0], mode="L") if gray else Image.fromarray(image)
    out = np.asarray(pil.resize((neww, newh), Image.BILINEAR))
    return np.expand_dims(out, -1) if gray else out


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB (or gray) uint8 image."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG")
    return buf.getvalue()
