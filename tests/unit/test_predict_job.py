"""
A ``d2persist predict`` job's bookkeeping (error records, reruns, folder syncs), with a predictor
that decodes each image as the ONNX Runtime predictor does and predicts nothing (fast).
"""

import json

import numpy as np
from PIL import Image

from d2persist.predict.images import decode_image
from d2persist.scale import batch
from d2persist.scale.batch import _RayPredict, predict_source


class _Prediction:
    def __init__(self, image):
        self.size = list(image.shape[:2])

    def to_json(self, image_name=None, min_score=0.0):
        return {"image": image_name, "size": self.size}


class _Decoder:
    """A predictor's interface: the image decoded from its bytes, its size the prediction."""

    sha256, backend, precision = "0" * 64, "onnxruntime", "fp32"

    def __call__(self, data):
        return _Prediction(decode_image(data, "BGR"))

    def visualizer_metadata(self):
        return {}


def _images(src):
    src.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(noise).save(src / "a.png")
    Image.fromarray(noise).save(src / "b.jpg", quality=90)
    whole = (src / "b.jpg").read_bytes()
    (src / "c.jpg").write_bytes(whole[: len(whole) // 2])  # truncated: verify() passes a JPEG
    return whole


def test_a_job_names_bad_images_redoes_them_and_syncs_before_it_is_done(tmp_path, mocker):
    src, dst = tmp_path / "src", tmp_path / "dst"
    whole_jpeg = _images(src)
    events = []
    real_sync, real_write = batch.fsync_dir, batch.write_bytes
    mocker.patch.object(batch, "fsync_dir", lambda p: (events.append(("sync", p)),
                                                       real_sync(p)))
    mocker.patch.object(batch, "write_bytes", lambda p, d, sync_folder=True: (
        events.append(("write", p.rsplit("/", 1)[-1])), real_write(p, d, sync_folder))[1])
    record = predict_source(_Decoder(), str(src), str(dst))
    assert record["counts"] == {"inputs": 3, "done": 2, "skipped": 0, "failed": 1}
    error = json.loads((dst / "c.jpg.error.json").read_text())
    assert error["path"] == str(src / "c.jpg")
    assert error["error"].startswith(f"Image {src / 'c.jpg'}: ") and "truncated" in error["error"]
    # every output's folder synced after its write and before job.json names the job finished
    last_output = max(i for i, e in enumerate(events) if e[0] == "write" and e[1] != "job.json"
                      and not e[1].startswith("."))
    job = events.index(("write", "job.json"))
    assert ("sync", str(dst)) in events[last_output:job]

    (src / "c.jpg").write_bytes(whole_jpeg)  # mended
    (dst / "a.png.error.json").write_text("{}")  # as if stopped between a JSON and the removal
    record = predict_source(_Decoder(), str(src), str(dst))
    assert record["counts"] == {"inputs": 3, "done": 2, "skipped": 1, "failed": 0}
    assert sorted(p.name for p in dst.iterdir()) == [
        ".d2persist-predict.json", "a.png.json", "b.jpg.json", "c.jpg.json", "job.json"]
    assert json.loads((dst / "c.jpg.json").read_text())["size"] == [40, 60]


def test_a_ray_retry_skips_a_written_image_and_removes_its_stale_error_record(tmp_path, mocker):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _images(src)
    dst.mkdir()
    (dst / "a.png.json").write_text("{}")  # written by the killed attempt, its removal not done
    (dst / "a.png.error.json").write_text("{}")
    synced = mocker.spy(batch, "fsync_dir")
    threads = 3
    loaded = []  # the threads each load was given: the actor's share of the cores
    actor = _RayPredict(lambda threads: loaded.append(threads) or _Decoder(), str(dst),
                        str(src), None, 0.5, False, threads, failed_before=["a.png"])
    assert loaded == [threads]
    paths = [str(src / n) for n in ("a.png", "b.jpg")]
    out = actor({"bytes": [(src / n).read_bytes() for n in ("a.png", "b.jpg")], "path": paths})
    assert list(out["status"]) == ["skipped", "done"]
    assert sorted(p.name for p in dst.iterdir()) == ["a.png.json", "b.jpg.json"]
    assert synced.call_args_list == [mocker.call(str(dst))]  # once, before Ray hears of it
