"""The torch-free image and output code against the detectron2 / pycocotools code it mirrors."""

import numpy as np
import pytest
import torch
from detectron2.data.detection_utils import read_image as d2_read_image
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.layers.mask_ops import paste_masks_in_image
from PIL import Image

from d2persist.errors import InputImageError
from d2persist.predict.images import (
    check_image_bytes,
    decode_image,
    read_image,
    resize_shortest_edge,
    resized_shape,
)
from d2persist.predict.onnx_predictor import paste_masks
from d2persist.predict.outputs import rle_encode
from d2persist.predict.predictor import decode_image_data


def test_rle_equals_pycocotools():
    mask_util = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    blob = np.zeros((40, 50), bool)
    blob[5:30, 10:45] = True
    masks = [blob, ~blob, np.zeros((3, 3), bool), np.ones((3, 3), bool)]
    masks += [rng.random((37, 23)) < p for p in (0.05, 0.5, 0.95)]
    for m in masks:
        want = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        assert rle_encode(m) == {"size": list(want["size"]), "counts": want["counts"].decode()}


@pytest.mark.parametrize("h,w", [(128, 128), (96, 128), (300, 41), (10, 500), (333, 777)])
def test_resize_equals_resize_shortest_edge(h, w):
    rng = np.random.default_rng(h * w)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    aug = ResizeShortestEdge(64, 96, sample_style="choice")
    want = aug.get_transform(image).apply_image(image)
    assert resized_shape(h, w, 64, 96) == want.shape[:2]
    np.testing.assert_array_equal(resize_shortest_edge(image, 64, 96), want)
    gray = image[:, :, :1]
    np.testing.assert_array_equal(resize_shortest_edge(gray, 64, 96),
                                  aug.get_transform(gray).apply_image(gray))


@pytest.mark.parametrize("fmt", ["BGR", "RGB", "L"])
def test_read_image_equals_detectron2(tmp_path, fmt):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    files = {"rgba.png": Image.fromarray(np.dstack([rgb, rgb[:, :, 0]]), "RGBA"),
             "gray.png": Image.fromarray(rgb[:, :, 1], "L"),
             "palette.png": Image.fromarray(rgb).convert("P")}
    for name, image in files.items():
        image.save(tmp_path / name)
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(rgb).save(tmp_path / "exif.jpg", exif=exif)
    for name in list(files) + ["exif.jpg"]:
        path = str(tmp_path / name)
        want = d2_read_image(path, format=fmt)
        np.testing.assert_array_equal(read_image(path, fmt), want)
        data = (tmp_path / name).read_bytes()  # the file's bytes, decoded without a file
        np.testing.assert_array_equal(decode_image(data, fmt), want)
        np.testing.assert_array_equal(decode_image_data(data, fmt), want)


def test_image_bytes_checked_and_decoded_with_one_sentence(tmp_path):
    noise = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "a.png")
    whole = (tmp_path / "a.png").read_bytes()
    check_image_bytes(whole, "s3://b/a.png")
    for data, sentence in [(b"", "Image s3://b/a.png is empty."),
                           (b"not an image", "s3://b/a.png is not an image file PIL can read."),
                           (whole[:-30], "Image s3://b/a.png is truncated or corrupt")]:
        with pytest.raises(InputImageError) as e:
            check_image_bytes(data, "s3://b/a.png")
        assert str(e.value).startswith(sentence)
    for decode in (decode_image, decode_image_data):
        with pytest.raises(InputImageError, match="^The image's bytes are not an image file"):
            decode(b"not an image", "BGR")
        with pytest.raises(InputImageError, match="^The image's bytes are truncated"):
            decode(whole[:len(whole) // 2], "BGR")


def test_a_png_evaluation_reads_is_not_refused_for_a_bad_crc(tmp_path):
    """
    PIL's verify checks each PNG chunk's CRC and the IEND chunk, which decoding (and so
    detectron2's read_image in evaluation) does not: such a file was refused as corrupt.
    """
    import zlib

    from d2persist.predict.images import check_image_file

    noise = np.random.default_rng(3).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "a.png")
    data = bytearray((tmp_path / "a.png").read_bytes())
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4:idat], "big")
    data[idat + 4 + length] ^= 0xFF  # the first byte of IDAT's CRC
    bad_crc = bytes(data)
    assert zlib.crc32(bad_crc[idat:idat + 4 + length]) != int.from_bytes(
        bad_crc[idat + 4 + length:idat + 8 + length], "big")
    for name, content in (("crc.png", bad_crc), ("no-iend.png", bad_crc[:-12])):
        path = tmp_path / name
        path.write_bytes(content)
        want = d2_read_image(str(path), format="BGR")
        check_image_file(str(path))
        check_image_bytes(content, name)
        np.testing.assert_array_equal(read_image(str(path), "BGR"), want)
        np.testing.assert_array_equal(decode_image(content, "BGR"), want)


def test_an_image_with_more_pixels_than_pil_decodes_is_not_called_corrupt(
        tmp_path, monkeypatch):
    from d2persist.predict.images import check_image_file

    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "big.png")
    path, data = str(tmp_path / "big.png"), (tmp_path / "big.png").read_bytes()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 600 pixels: over twice the limit
    for call, subject in [(lambda: check_image_file(path), f"image {path}"),
                          (lambda: check_image_bytes(data, "s3://b/big.png"),
                           "image s3://b/big.png"),
                          (lambda: decode_image(data, "BGR"), "the image's bytes")]:
        with pytest.raises(InputImageError) as e:
            call()
        assert str(e.value).startswith(f"Too many pixels in {subject} for PIL (Image size "
                                       "(600 pixels) exceeds limit"), str(e.value)
        assert str(e.value).endswith("; raise PIL.Image.MAX_IMAGE_PIXELS to read it.")


def test_an_image_the_machine_refuses_is_not_called_corrupt(tmp_path, mocker):
    from d2persist.predict.images import check_image_file

    path = str(tmp_path / "a.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    mocker.patch("d2persist.predict.images.Image.open",
                 side_effect=PermissionError(13, "Permission denied", path))
    with pytest.raises(InputImageError) as e:
        check_image_file(path)
    assert str(e.value) == f"Cannot read image {path}: Permission denied."


def test_paste_masks_equals_detectron2():
    rng = np.random.default_rng(2)
    masks = rng.random((12, 28, 28)).astype(np.float32)
    xy = rng.uniform(0, 50, (12, 2))
    wh = rng.uniform(0.5, 40, (12, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    boxes = np.clip(boxes, 0, [80, 60, 80, 60]).astype(np.float32)  # clipped, as in prediction
    want = paste_masks_in_image(torch.from_numpy(masks), torch.from_numpy(boxes), (60, 80))
    got = paste_masks(masks, boxes, 60, 80)
    assert got.shape == tuple(want.shape)
    differ = (got != want.numpy()).sum()
    assert differ <= 2, differ  # float rounding at the 0.5 threshold, at most
