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


def test_run_folder_naming_a_foreign_config_function_is_refused(tmp_path):
    (tmp_path / "config.yaml").write_text("MODEL:\n  META_ARCHITECTURE: GeneralizedRCNN\n")
    (tmp_path / "persist.yaml").write_text("PERSIST:\n  CONFIG_EXTENSIONS: ['os:system']\n")
    (tmp_path / "model_0000001.pth").write_bytes(b"x")
    with pytest.raises(UnsafeArtifactError, match="persist.yaml.*'os:system'"):
        resolve_artifacts(str(tmp_path))


def test_folder_without_artifacts_is_one_sentence(tmp_path):
    with pytest.raises(ArtifactError, match="neither an export"):
        resolve_artifacts(str(tmp_path))


@pytest.mark.parametrize("change", [{"format": {"name": "d2persist-export", "version": "1"}},
                                    {"config": ["config.yaml"]}, {"files": {"config.yaml": 3}},
                                    {"input": None}])
def test_malformed_manifest_is_one_sentence(tmp_path, change):
    import json

    from d2persist import read_manifest

    manifest = {"format": {"name": "d2persist-export", "version": 1}, "config": "config.yaml",
                "weights": "model.safetensors", "input": {"format": "BGR"},
                "files": {"config.yaml": {"sha256": "0", "size": 0},
                          "model.safetensors": {"sha256": "0", "size": 0}}}
    (tmp_path / "manifest.json").write_text(json.dumps(dict(manifest, **change)))
    with pytest.raises(ArtifactError, match="manifest"):
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
