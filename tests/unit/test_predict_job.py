"""
A ``d2persist predict`` job's bookkeeping (error records, reruns, folder syncs), with a predictor
that decodes each image as the ONNX Runtime predictor does and predicts nothing (fast).
"""

import json

import numpy as np
import pytest
from PIL import Image

from d2persist.errors import InputImageError, OutputPathError
from d2persist.predict.images import decode_image
from d2persist.scale import batch
from d2persist.scale.batch import _RayPredict, check_destination, predict_source


class _Prediction:
    def __init__(self, image):
        self.size = list(image.shape[:2])

    def to_json(self, image_name=None, min_score=0.0):
        return {"image": image_name, "size": self.size}

    def draw(self, metadata, min_score=0.0):
        return np.zeros((self.size[0], self.size[1], 3), np.uint8)


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


def test_an_actor_with_other_weights_refuses_and_so_does_the_jobs_destination(
        tmp_path, mocker):
    """
    The artifacts replaced between the driver's description and an actor's load: the actor
    writes nothing and says so (on Ray, the job ends with that sentence). The destination
    holds that job's record and no output: still refused to a job with the new weights (the
    other may be starting, where no lock can tell); into another, they predict.
    """
    from d2persist.errors import D2PersistError

    src, dst = tmp_path / "src", tmp_path / "dst"
    _images(src)
    mocker.patch.object(batch, "refusal_on_node", lambda e: f"On Ray's node N: {e}")
    stopped = mocker.Mock(side_effect=KeyboardInterrupt)  # the driver of the job that ended
    stopped.sha256, stopped.backend, stopped.precision = "1" * 64, "onnxruntime", "fp32"
    with pytest.raises(KeyboardInterrupt):
        predict_source(stopped, str(src), str(dst))  # its record written, no output
    actor = _RayPredict(lambda threads: _Decoder(), str(dst), str(src), None, 0.5, False, 1,
                        sha256="1" * 64)
    out = actor({"bytes": [(src / "a.png").read_bytes()], "path": [str(src / "a.png")]})
    assert list(out["status"]) == ["refused"] and out["detail"][0] == (
        "On Ray's node N: The artifacts changed after the driver read them: this copy loaded "
        f"weights with sha256 {'0' * 12}..., not {'1' * 12}...; predict into another --output "
        "to use the new ones.")
    assert [p.name for p in dst.iterdir()] == [".d2persist-predict.json"]
    with pytest.raises(D2PersistError, match=r"holds another job's record, and no output yet "
                                             r"\(weights_sha256 '1{64}', this one '0{64}'\): "
                                             r"predict into another --output, or remove it"):
        predict_source(_Decoder(), str(src), str(dst))
    record = predict_source(_Decoder(), str(src), str(tmp_path / "new"))
    assert record["counts"]["done"] == 2 and record["weights_sha256"] == "0" * 64
    with pytest.raises(D2PersistError, match=r"holds the outputs of another job \(weights_sha256 "):
        predict_source(stopped, str(src), str(tmp_path / "new"))


def test_of_two_jobs_starting_into_one_folder_at_once_one_is_refused(tmp_path, mocker):
    """
    Both found no job's record there; the one that creates it second (the other's record
    created between its look and its write) reads it and is refused, as a later start is.
    """
    from d2persist.errors import D2PersistError

    src, dst = tmp_path / "src", tmp_path / "dst"
    _images(src)
    other = _Decoder()
    other.sha256 = "1" * 64
    create = batch._Destination.create

    def the_other_job_creates_it_first(self, name, data):
        mocker.stopall()  # (the other job's own create is the real one)
        batch._check_same_job(batch._Destination(str(dst)), batch.job_identity(
            other, batch.list_source(str(src)).url, 0.5, False))
        return create(self, name, data)

    mocker.patch.object(batch._Destination, "create", the_other_job_creates_it_first)
    with pytest.raises(D2PersistError, match=r"holds another job's record, and no output yet "
                                             r"\(weights_sha256 '1{64}', this one '0{64}'\)"):
        predict_source(_Decoder(), str(src), str(dst))
    assert [p.name for p in dst.iterdir()] == [".d2persist-predict.json"]
    assert json.loads((dst / ".d2persist-predict.json").read_text())["weights_sha256"] == "1" * 64


def _tree(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_a_destination_that_is_a_file_or_holds_other_files_is_refused_untouched(tmp_path):
    src = tmp_path / "src"
    _images(src)
    (tmp_path / "notes").write_text("mine")
    with pytest.raises(OutputPathError, match="notes is a file"):
        predict_source(_Decoder(), str(src), str(tmp_path / "notes"))
    theirs = tmp_path / "theirs"  # files of the user's, no job's record among them
    theirs.mkdir()
    (theirs / "job.json").write_text("{}")
    (theirs / "a.png.json").write_text("mine")
    before = _tree(theirs)
    with pytest.raises(OutputPathError, match="'a.png.json'.*empty or new"):
        check_destination(str(theirs))  # what the command asks before loading the model
    with pytest.raises(OutputPathError, match="holds files no d2persist predict job wrote"):
        predict_source(_Decoder(), str(src), str(theirs))
    assert _tree(theirs) == before
    with pytest.raises(OutputPathError, match="src already holds"):  # the images' own folder
        predict_source(_Decoder(), str(src), str(src))
    assert sorted(p.name for p in src.iterdir()) == ["a.png", "b.jpg", "c.jpg"]
    check_destination(str(tmp_path / "new" / "dst"))  # nothing there yet: fine, and not made
    assert not (tmp_path / "new").exists()


def test_a_job_record_cut_short_or_a_folder_marker_does_not_refuse_the_destination(
        tmp_path, mocker):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _images(src)
    dst.mkdir()  # a first run killed while it wrote its record: only the record's temp file
    (dst / ".d2persist-tmp-.d2persist-predict.json.0a1b").write_text('{"src": ')
    record = predict_source(_Decoder(), str(src), str(dst))
    assert record["counts"] == {"inputs": 3, "done": 2, "skipped": 0, "failed": 1}
    empty = batch._Destination(str(tmp_path / "marked"))
    # an object store's folder made in its console lists the folder itself (s3fs)
    mocker.patch.object(empty.fs, "ls", return_value=[empty.root + "/"])
    check_destination(empty)
    mocker.patch.object(empty.fs, "ls", return_value=[empty.root + "/", empty.root + "/x.json"])
    with pytest.raises(OutputPathError, match="'x.json'"):
        check_destination(empty)


def test_a_destination_inside_the_source_is_not_read_as_input(tmp_path):
    src = tmp_path / "src"
    _images(src)
    dst = src / "predictions"
    first = predict_source(_Decoder(), str(src), str(dst), pictures=True)
    assert first["counts"] == {"inputs": 3, "done": 2, "skipped": 0, "failed": 1}
    assert (dst / "a.png.png").is_file()  # a picture, inside the source folder
    again = predict_source(_Decoder(), str(src), str(dst), pictures=True)
    assert again["counts"] == {"inputs": 3, "done": 0, "skipped": 2, "failed": 1}
    assert not (dst / "predictions").exists()


def test_sources_and_destinations_that_cannot_be_read_are_one_sentence(tmp_path):
    src = tmp_path / "src"
    _images(src)
    (tmp_path / "pic.gif").write_bytes(b"GIF89a\x01\x00\x01\x00\x80\xff\x00")
    with pytest.raises(InputImageError, match="pic.gif is neither an image .* nor a text file"):
        predict_source(_Decoder(), str(tmp_path / "pic.gif"), str(tmp_path / "out"))
    with pytest.raises(InputImageError, match=r"Cannot read foo://x \(ValueError: Protocol"):
        predict_source(_Decoder(), "foo://x", str(tmp_path / "out"))
    with pytest.raises(OutputPathError, match=r"Cannot write to foo://y \(ValueError: Proto"):
        predict_source(_Decoder(), str(src), "foo://y")
    with pytest.raises(OutputPathError, match="Cannot write to foo://y"):
        check_destination("foo://y")


def test_a_job_record_of_another_version_is_compared_whole(tmp_path):
    """
    A job's record holding a key this version does not write (a later d2persist's part of a
    job's identity) is another job's, not this one's; one that is JSON but not an object is
    refused in one sentence (was an AttributeError).
    """
    from d2persist.errors import D2PersistError

    src, dst = tmp_path / "src", tmp_path / "dst"
    _images(src)
    predict_source(_Decoder(), str(src), str(dst))
    record = dst / ".d2persist-predict.json"
    later = dict(json.loads(record.read_text()), tile_size=512)
    record.write_text(json.dumps(later))
    with pytest.raises(D2PersistError, match=r"holds the outputs of another job \(tile_size "
                                             r"512, this one None\)"):
        predict_source(_Decoder(), str(src), str(dst))
    record.write_text("[1, 2]")
    with pytest.raises(D2PersistError, match=r"holds the outputs of another job \(\w+ None, "):
        predict_source(_Decoder(), str(src), str(dst))


def test_long_image_names_are_predicted_or_refused_up_front(tmp_path):
    """
    A 230-byte image name (allowed) made a temporary name of over 255 bytes: ENAMETOOLONG, a
    traceback, and every rerun ended at the same image. Temporary names are cut now; a name
    whose error record could not be written here is refused before anything is predicted.
    """
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    long = "x" * 226 + ".png"
    Image.fromarray(noise).save(src / long)
    record = predict_source(_Decoder(), str(src), str(dst))
    assert record["counts"] == {"inputs": 1, "done": 1, "skipped": 0, "failed": 0}
    assert (dst / (long + ".json")).is_file()
    longer = "y" * 246 + ".png"  # its .error.json: 261 bytes
    Image.fromarray(noise).save(src / longer)
    with pytest.raises(InputImageError, match=rf"^The outputs of {src / longer} would have "
                                              rf"names of 261 bytes, and {dst} takes at most "
                                              r"255: rename the image"):
        predict_source(_Decoder(), str(src), str(dst))
    assert not (dst / (longer + ".json")).exists()


def test_a_list_files_folder_that_cannot_be_listed_asks_each_image(tmp_path, mocker):
    """Credentials that read objects and list nothing (or a web server without index pages):
    a failed listing is not 'every image missing'; each one is asked on its own."""
    src = tmp_path / "src"
    _images(src)
    (src / "list.txt").write_text("a.png\nb.jpg\ngone.png\n")
    fs = type(batch.list_source(str(src)).fs)
    mocker.patch.object(fs, "ls", side_effect=PermissionError("Access Denied"))
    listed = batch.list_source(str(src / "list.txt"))
    assert [n for _, n in listed.items] == ["a.png", "b.jpg"]
    assert [n for _, n in listed.missing] == ["gone.png"]
