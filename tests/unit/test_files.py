"""Atomic writes, safe loading and hostile artifacts, without training (fast)."""

import os

import pytest

from d2persist import ArtifactError, UnsafeArtifactError, resolve_artifacts
from d2persist.files import atomic
from d2persist.files.atomic import atomic_path, write_bytes, write_text
from d2persist.files.safe_load import safe_yaml_load
from d2persist.layout import TEMP_PREFIX


def test_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "config.yaml"
    write_text(str(path), "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(str(path)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(TEMP_PREFIX)]


def test_atomic_writes_get_the_mode_open_gives_and_sync_as_asked(tmp_path, mocker):
    with open(tmp_path / "plain", "w"):
        pass
    want = os.stat(tmp_path / "plain").st_mode
    synced = mocker.spy(atomic, "fsync_dir")
    write_text(str(tmp_path / "a.txt"), "a")
    with atomic_path(str(tmp_path / "b.txt")) as tmp:
        open(tmp, "w").close()
    assert synced.call_count == 2
    write_bytes(str(tmp_path / "c.bin"), b"c", sync_folder=False)  # the caller syncs
    assert synced.call_count == 2
    assert (tmp_path / "c.bin").read_bytes() == b"c"
    assert {os.stat(tmp_path / n).st_mode for n in ("a.txt", "b.txt", "c.bin")} == {want}
    failing = mocker.patch("os.replace", side_effect=OSError("disk gone"))
    with pytest.raises(OSError, match="disk gone"):
        write_bytes(str(tmp_path / "d.bin"), b"d")
    assert failing.called and sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt", "c.bin", "plain"]


def test_yaml_python_tags_are_refused(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("MODEL: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(UnsafeArtifactError, match="python"):
        safe_yaml_load(str(path))


def test_a_lazy_configs_shape_spec_reads_and_diffs_without_detectron2(tmp_path, monkeypatch):
    """
    LazyConfig.save writes detectron2's ShapeSpec as a python tag: read as its fields where
    detectron2 is not installed (ls, verify, diff and ONNX Runtime need none), and shown by
    diff either way.
    """
    import sys

    from detectron2.layers import ShapeSpec

    from d2persist.__main__ import _value
    from d2persist.files.safe_load import safe_yaml_loads

    text = ("model:\n  shape: !!python/object:detectron2.layers.shape_spec.ShapeSpec\n"
            "    channels: 64\n    stride: 4\n")
    assert safe_yaml_loads(text)["model"]["shape"] == ShapeSpec(channels=64, stride=4)
    assert _value(ShapeSpec(channels=64, stride=4)) == (
        '{"channels": 64, "height": null, "width": null, "stride": 4}')
    monkeypatch.setitem(sys.modules, "detectron2.layers", None)
    assert safe_yaml_loads(text)["model"]["shape"] == {"channels": 64, "stride": 4}


def test_run_folder_naming_a_foreign_config_function_is_refused(tmp_path):
    (tmp_path / "config.yaml").write_text("MODEL:\n  META_ARCHITECTURE: GeneralizedRCNN\n")
    (tmp_path / "persist.yaml").write_text("PERSIST:\n  CONFIG_EXTENSIONS: ['os:system']\n")
    (tmp_path / "model_0000001.pth").write_bytes(b"x")
    with pytest.raises(UnsafeArtifactError, match="persist.yaml.*'os:system'"):
        resolve_artifacts(str(tmp_path))


def test_folder_without_artifacts_is_one_sentence(tmp_path):
    with pytest.raises(ArtifactError, match="neither an export"):
        resolve_artifacts(str(tmp_path))


@pytest.mark.parametrize("change,said", [
    ({"format": {"name": "d2persist-export", "version": "1"}}, "manifest this version can read"),
    ({"config": ["config.yaml"]}, "does not list the bundle's config"),
    ({"files": {"config.yaml": 3}}, "does not list the bundle's config"),
    ({"input": None}, "manifest this version can read"),
    ({"format": {"name": "d2persist-export", "version": 2}}, r"manifest.json was written by a "
     r"newer d2persist \(format version 2; this one reads up to 1\): read it with a newer")])
def test_malformed_manifest_is_one_sentence(tmp_path, change, said):
    import json

    from d2persist import read_manifest

    manifest = {"format": {"name": "d2persist-export", "version": 1}, "config": "config.yaml",
                "weights": "model.safetensors", "input": {"format": "BGR"},
                "files": {"config.yaml": {"sha256": "0", "size": 0},
                          "model.safetensors": {"sha256": "0", "size": 0}}}
    (tmp_path / "manifest.json").write_text(json.dumps(dict(manifest, **change)))
    with pytest.raises(ArtifactError, match=said):
        read_manifest(str(tmp_path), verify=False)


def test_outputs_that_would_overwrite_each_other_are_refused(tmp_path):
    import numpy as np
    from PIL import Image

    from d2persist import InputImageError
    from d2persist.predict.infer import predict_files

    images = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / folder / "x.png")
        images.append(str(tmp_path / folder / "x.png"))
    with pytest.raises(InputImageError, match="'x'.*overwrite"):
        predict_files(None, images, json_out=str(tmp_path / "out"), many=True)
    assert not (tmp_path / "out").exists()


def test_file_mirror_renames_complete_copies_into_place(tmp_path):
    from d2persist.files.mirror import Mirror, Uploader, is_url

    assert is_url("s3://b/run") and not is_url(str(tmp_path)) and not is_url("file:///x")
    src = tmp_path / "model.pth"
    src.write_bytes(b"weights")
    mirror = Mirror(f"file://{tmp_path}/mirror")
    uploader = Uploader(mirror, backoff=0.0)
    uploader.submit([("model.pth", str(src)), ("last_checkpoint", b"model.pth")])
    uploader.submit([("gone.pth", str(tmp_path / "missing.pth")), ("never", b"x")])
    uploader.wait()
    assert mirror.names() == ["last_checkpoint", "model.pth"]  # no temp file, no "never"
    assert mirror.read_text("last_checkpoint") == "model.pth"
    mirror.get("model.pth", str(tmp_path / "back.pth"))
    assert (tmp_path / "back.pth").read_bytes() == b"weights"
    uploader.submit([("model.pth", None)])
    uploader.wait()
    assert mirror.names() == ["last_checkpoint"] and uploader.failures == 0


def test_a_bundle_is_replaced_at_the_mirror_in_one_job_its_old_manifest_removed_first(
        tmp_path, mocker):
    """
    The old manifest's removal failing, the new files are not uploaded under it (they were,
    by a job of their own: a bundle that then read as damaged at the mirror, for good).
    """
    from d2persist.files.mirror import Mirror, RunMirror

    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    for name in ("model.safetensors", "manifest.json"):
        (run / "export" / name).write_bytes(b"new " + name.encode())
    jobs = RunMirror(f"file://{tmp_path}/mirror", str(run))
    jobs.uploader.backoff = 0.0
    mocker.patch.object(Mirror, "remove", side_effect=ConnectionError("store unreachable"))
    put = mocker.spy(Mirror, "put")
    jobs.upload("model.safetensors", "manifest.json", folder="export",
                remove_first=["manifest.json"])
    jobs.uploader.wait()
    assert put.call_count == 0 and jobs.uploader.failures == 1
    mocker.stopall()
    jobs.upload("model.safetensors", "manifest.json", folder="export",
                remove_first=["manifest.json"])
    jobs.uploader.wait()
    assert jobs.uploader.mirror.names("export") == ["manifest.json", "model.safetensors"]


def test_uploads_try_once_while_the_mirror_is_down_and_retry_once_it_is_back(tmp_path, caplog):
    """A failed upload is retried; later ones get one try until one succeeds; then retries."""
    from d2persist.files.mirror import Uploader

    class Store:  # a store that is down, then back (the real one: tests/test_mirror.py)
        url, down, calls = "memory://", True, []

        def put(self, source, name):
            self.calls.append(name)
            if self.down:
                raise ConnectionError("store unreachable")

    store, src = Store(), tmp_path / "f"
    src.write_bytes(b"x")
    uploader = Uploader(store, tries=3, backoff=0.0)
    with caplog.at_level("ERROR", logger="d2persist"):
        for name in ("a", "b", "c"):
            uploader.submit([(name, str(src))])
        uploader.wait()
        store.down = False
        uploader.submit([("d", str(src))])
        uploader.wait()
        store.down = True
        uploader.submit([("e", str(src))])
        uploader.wait()
    # a: 3 tries, then down: b and c one each; d succeeds: back up, so e gets its 3 tries
    assert store.calls == ["a"] * 3 + ["b", "c", "d"] + ["e"] * 3
    assert uploader.failures == 4
    assert len([r for r in caplog.records if "Could not copy" in r.getMessage()]) == 1


def _age(path, days):
    """Stamp ``path`` as last used ``days`` ago."""
    import time

    then = time.time() - days * 86400
    os.utime(path, (then, then))


def _days_unused(path):
    import time

    return (time.time() - os.stat(path).st_mtime) / 86400


def test_a_bundle_urls_versions_unused_for_a_week_leave_the_cache(tmp_path, monkeypatch):
    """
    A bundle re-exported to one URL adds a version to the cache each time: the versions, and
    other URLs' bundles, that no process loaded for a week go as a bundle is downloaded or
    loaded from the cache; recent ones, and the one loaded whatever its age, stay.
    """
    from test_bad_input import _memory_bundle

    from d2persist.artifacts.manifest import local_bundle

    monkeypatch.setenv("D2PERSIST_CACHE", str(tmp_path / "cache"))
    root = f"/d2persist-test-{os.getpid()}-{tmp_path.name}"
    url, other = f"memory://{root}/export", f"memory://{root}/other"

    def publish(where, weights):
        return _memory_bundle(where, {"config.yaml": b"MODEL: {}\n", "model.safetensors": weights})

    try:
        publish(f"{root}/other", b"o" * 10)
        elsewhere = local_bundle(other)
        made = []
        for weights in (b"1" * 10, b"2" * 10):
            publish(f"{root}/export", weights)
            made.append(local_bundle(url))
        versions = os.path.dirname(made[0])
        _age(made[0], 8)  # a week and a day unused
        _age(made[1], 6)
        _age(os.path.dirname(elsewhere), 6)  # (another URL's folder: used within the week)
        publish(f"{root}/export", b"3" * 10)
        made.append(local_bundle(url))  # downloaded: the version unused for a week goes
        assert sorted(os.listdir(versions)) == sorted(os.path.basename(v) for v in made[1:])
        assert open(os.path.join(made[1], "model.safetensors"), "rb").read() == b"2" * 10
        _age(made[1], 8)
        _age(made[2], 30)  # the one the URL holds now: stamped again as it is loaded
        _age(os.path.dirname(elsewhere), 8)
        assert local_bundle(url) == made[2]  # from the cache: the unused ones go
        assert os.listdir(versions) == [os.path.basename(made[2])]
        assert not os.path.exists(os.path.dirname(elsewhere))
        assert _days_unused(made[2]) < 0.01  # used now
    finally:
        import fsspec

        fsspec.filesystem("memory").rm(root, recursive=True)


def test_onnxruntime_graphs_unused_for_a_week_leave_the_cache(tmp_path, monkeypatch):
    import onnx
    from onnx import TensorProto, helper

    from d2persist.predict.onnx_predictor import create_session

    monkeypatch.setenv("D2PERSIST_CACHE", str(tmp_path / "cache"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = str(tmp_path / "model.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), model)
    graphs = tmp_path / "cache" / "onnxruntime"
    graphs.mkdir(parents=True)
    for name, days in (("old.onnx", 8), ("recent.onnx", 6), (f"{TEMP_PREFIX}x.onnx.1", 2),
                       (f"{TEMP_PREFIX}y.onnx.2", 0.5), ("notes.txt", 30)):
        (graphs / name).write_bytes(b"")
        _age(graphs / name, days)
    before = set(os.listdir(graphs))
    _, cached = create_session(model, sha256="a" * 64)  # a new graph cached: the old one goes
    new = set(os.listdir(graphs)) - before
    assert not cached and len(new) == 1
    # a graph unused for a week, and a write a killed process left over a day ago, go
    assert set(os.listdir(graphs)) == new | before - {"old.onnx", f"{TEMP_PREFIX}x.onnx.1"}
    graph = graphs / new.pop()
    _age(graph, 30)
    _, cached = create_session(model, sha256="a" * 64)  # loaded from the cache: stamped
    assert cached and _days_unused(graph) < 0.01


def test_a_file_replaced_or_removed_since_its_identity_was_taken_is_refused(tmp_path):
    from d2persist.files.atomic import check_unchanged, file_identity

    path = tmp_path / "model.safetensors"
    write_bytes(str(path), b"old")
    identity = file_identity(str(path))
    os.link(path, tmp_path / "another name")  # (a hard link: the same file)
    check_unchanged(str(path), identity)
    write_bytes(str(path), b"old")  # the same bytes, written again: another file
    with pytest.raises(ArtifactError, match=r"model.safetensors was replaced while it was "
                                            r"being loaded \(a new export or checkpoint"):
        check_unchanged(str(path), identity)
    os.unlink(path)
    with pytest.raises(ArtifactError, match=r"model.safetensors was removed while it was being "
                                            r"loaded \(the run's retention, or a new export"):
        check_unchanged(str(path), identity)


def test_without_a_home_the_cache_is_not_a_folder_named_tilde(monkeypatch, mocker):
    """No $HOME and no passwd entry (a container's user): expanduser("~") is "~", and the
    cache was ./~/.cache/d2persist wherever the command ran."""
    import tempfile

    from d2persist.layout import cache_root

    monkeypatch.delenv("D2PERSIST_CACHE", raising=False)
    monkeypatch.delenv("HOME", raising=False)
    mocker.patch("pwd.getpwuid", side_effect=KeyError("no such user"))
    assert os.path.expanduser("~") == "~"  # (the premise)
    assert cache_root() == os.path.join(tempfile.gettempdir(), f"d2persist-cache-{os.getuid()}")
    monkeypatch.setenv("HOME", "/home/someone")
    assert cache_root() == "/home/someone/.cache/d2persist"


def test_temporary_folders_a_killed_export_left_are_removed_too(tmp_path):
    """INT8 quantization's temporary folder in a bundle, left by a kill: its removal raised
    IsADirectoryError, and every later export of the run (the resume's) ended there."""
    from d2persist.files.atomic import remove_temp_files

    (tmp_path / f"{TEMP_PREFIX}quant-x").mkdir()
    (tmp_path / f"{TEMP_PREFIX}quant-x" / "pre.onnx").write_bytes(b"graph")
    (tmp_path / f"{TEMP_PREFIX}manifest.json.0a1b").write_text("{")
    (tmp_path / "model.onnx").write_bytes(b"kept")
    assert sorted(remove_temp_files(str(tmp_path))) == [
        f"{TEMP_PREFIX}manifest.json.0a1b", f"{TEMP_PREFIX}quant-x"]
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_a_bundle_exported_again_while_it_is_read_is_not_called_damaged(tmp_path, mocker):
    """
    A resumed run (or export_model.py) writing the bundle again while a predictor verified
    it: its new weights did not match the old manifest read first, reported as damage ("does
    not match its sha256"); the manifest changed meanwhile, so it says to read it again.
    """
    import hashlib
    import json

    from d2persist import read_manifest
    from d2persist.artifacts import bundle

    def export(weights):
        files = {"config.yaml": b"MODEL: {}\n", "model.safetensors": weights}
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
        (tmp_path / "manifest.json").write_text(json.dumps({
            "format": {"name": "d2persist-export", "version": 1}, "config": "config.yaml",
            "weights": "model.safetensors", "input": {"format": "BGR"},
            "files": {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                      for n, d in files.items()}}))

    export(b"weights 1")
    real = bundle._bundle_file_problem

    def exported_meanwhile(folder, name, entry, *args, **kwargs):
        if name == "model.safetensors":
            export(b"weights 2")
        return real(folder, name, entry, *args, **kwargs)

    mocker.patch.object(bundle, "_bundle_file_problem", side_effect=exported_meanwhile)
    with pytest.raises(ArtifactError, match=r"was exported again while it was being read .*: "
                                            r"read it again\.$"):
        read_manifest(str(tmp_path))
    mocker.stopall()
    (tmp_path / "model.safetensors").write_bytes(b"weights 3")  # damage: the manifest as it was
    with pytest.raises(ArtifactError, match="does not match"):
        read_manifest(str(tmp_path))
