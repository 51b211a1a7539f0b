"""
The run view on small hand-made folders (no training): what each kind of damage reads as, and
that names taken from artifacts never leave their folder. Real runs: tests/test_runview.py.
"""

import hashlib
import os

import pytest

from d2persist import D2PersistError, UnsafeArtifactError
from d2persist.artifacts.folders import _remote_name
from d2persist.artifacts.view import find_newest_valid, open_view


def _checkpoint(folder, name, data=b"weights"):
    (folder / name).write_bytes(data)
    (folder / (name + ".sha256")).write_text(f"{hashlib.sha256(data).hexdigest()}  {name}\n")


@pytest.fixture
def run(tmp_path):
    for it in (1, 3):
        _checkpoint(tmp_path, f"model_{it:07d}.pth", b"weights %d" % it)
    (tmp_path / "last_checkpoint").write_text("model_0000003.pth")
    (tmp_path / "config.yaml").write_text("MODEL:\n  DEVICE: cpu\n")
    return tmp_path


def test_a_whole_run_verifies_and_lists_newest_first(run):
    view = open_view(str(run))
    assert view.verify(workers=2) == ([], [])
    assert [e.name for e in view.checkpoints()] == ["model_0000003.pth", "model_0000001.pth"]
    assert view.checkpoints()[0].markers == ["last"]


def test_a_run_still_training_verifies_as_it_was_when_verify_began(run, mocker):
    """
    While verify hashes, the run writes a checkpoint, names it in last_checkpoint, and its
    retention removes the oldest: nothing is reported damaged or inconsistent (verify's exit
    0); the removed one is a note.
    """
    from d2persist.artifacts.view import RunView

    hash_files = RunView._hash

    def training_meanwhile(jobs, progress, workers):
        digests = hash_files(jobs, progress, workers)
        _checkpoint(run, "model_0000005.pth", b"weights 5")
        (run / "last_checkpoint").write_text("model_0000005.pth")
        for name in ("model_0000001.pth", "model_0000001.pth.sha256"):
            os.unlink(run / name)
        return digests

    mocker.patch.object(RunView, "_hash", side_effect=training_meanwhile)
    assert open_view(str(run)).verify() == ([], [
        f"{run / 'model_0000001.pth'} was removed while this ran (a run still training keeps "
        "its newest checkpoints): not checked."])


def test_each_damage_is_one_problem_naming_the_file(run):
    (run / "config.yaml").write_bytes(b"MODEL: \xff\xfe\x00 broken")  # not UTF-8
    (run / "model_0000001.pth.sha256").write_bytes(b"\xff\xfe garbled")
    problems, notes = open_view(str(run)).verify()
    assert [(p.path, p.kind) for p in problems] == [
        (str(run / "model_0000001.pth"), "damaged"), (str(run / "config.yaml"), "damaged")]
    assert problems[0].sentence.startswith(f"{run / 'model_0000001.pth'}: its sidecar "
                                           "model_0000001.pth.sha256 holds no sha256 (damaged)")
    assert str(run / "config.yaml") in problems[1].sentence
    assert "not valid YAML" in problems[1].sentence
    assert not notes


def test_a_python_tag_in_persist_yaml_is_refused_in_one_sentence(run):
    (run / "persist.yaml").write_text("PERSIST: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(UnsafeArtifactError, match="Refusing to load .*persist.yaml") as e:
        open_view(str(run)).export()
    assert "\n" not in str(e.value)


def test_resume_order_puts_last_checkpoint_first_and_skips_damage(run, caplog):
    (run / "last_checkpoint").write_text("model_0000001.pth")
    assert find_newest_valid(str(run)) == str(run / "model_0000001.pth")
    (run / "model_0000001.pth").write_bytes(b"weights 9")
    assert find_newest_valid(str(run)) == str(run / "model_0000003.pth")
    assert "model_0000001.pth is not usable" in caplog.text


def test_hard_links_are_hashed_once_and_share_markers(run, mocker):
    os.link(run / "model_0000003.pth", run / "model_final.pth")  # as PersistHook links it
    sidecar = (run / "model_0000003.pth.sha256").read_text()
    (run / "model_final.pth.sha256").write_text(sidecar.replace("model_0000003", "model_final"))
    (run / "last_checkpoint").write_text("model_final.pth")
    view = open_view(str(run))
    hashed = mocker.spy(type(view._folder), "sha256")
    assert view.verify() == ([], [])
    assert hashed.call_count == 2  # model_0000003 (= model_final) and model_0000001
    rows = {e.name: e for e in view.checkpoints()}
    assert rows["model_final.pth"].iteration == 3
    assert rows["model_0000003.pth"].markers == ["last", "final"]


@pytest.mark.parametrize("name", ["../other/model.onnx", "/etc/passwd", "a/../../b", "", ".."])
def test_names_from_a_remote_manifest_never_leave_the_bundle(name):
    with pytest.raises(UnsafeArtifactError):
        _remote_name(name, "s3://bucket/run/export")
    assert _remote_name("./sub/model.onnx", "s3://b/x") == "sub/model.onnx"


def test_neither_kind_of_folder_is_one_sentence(tmp_path):
    with pytest.raises(D2PersistError, match="missing does not exist"):
        open_view(str(tmp_path / "missing"))
    (tmp_path / "a_file").write_text("hi")
    with pytest.raises(D2PersistError, match="a_file is not a folder"):
        open_view(str(tmp_path / "a_file"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(D2PersistError, match="neither a run folder"):
        open_view(str(tmp_path))


def test_a_checkpoint_without_sidecar_is_found_by_its_hash(tmp_path):
    """
    Checkpoints stock detectron2 wrote (no sidecar): the one a Ray job's driver described by
    its sha256 is found by hashing it, not skipped as if the run had removed it.
    """
    import torch

    from d2persist.artifacts.view import newest_valid_noted

    for it in (1, 3):
        torch.save({"model": {"w": torch.tensor([float(it)])}, "iteration": it},
                   tmp_path / f"model_{it:07d}.pth")
    digest = hashlib.sha256((tmp_path / "model_0000001.pth").read_bytes()).hexdigest()
    found = newest_valid_noted(str(tmp_path), digest)
    assert found is not None and found[0] == str(tmp_path / "model_0000001.pth")
    assert found[2] is None  # no sidecar: the loader hashes what it loaded
    assert newest_valid_noted(str(tmp_path), "0" * 64) is None


def test_a_lazy_config_with_objects_saved_beside_a_pickle_is_a_note(run):
    """
    LazyConfig.save writes what YAML cannot hold as python tags, and config.yaml.pkl beside
    it (a run with PERSIST.EXPORT False may): not damage; the same tags without it are.
    """
    (run / "config.yaml").write_text(
        "model:\n  norm: !!python/name:torch.nn.LayerNorm ''\n")
    problems, _ = open_view(str(run)).verify()
    assert [(p.path, p.kind) for p in problems] == [(str(run / "config.yaml"), "damaged")]
    (run / "config.yaml.pkl").write_bytes(b"pickled")
    problems, notes = open_view(str(run)).verify()
    assert problems == [] and any("config.yaml.pkl beside it" in n for n in notes)


def test_diff_compares_a_lazyconfigs_options_once_as_options(tmp_path):
    """train.persist is the run's options (persist.yaml), not config keys too."""
    import yaml

    from d2persist.artifacts.describe import diff
    from d2persist.config import DEFAULT_OPTIONS

    config = {"model": {"_target_": "x.Model"},
              "train": {"max_iter": 5, "persist": {"max_to_keep": 2}}}
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "persist.yaml").write_text(yaml.safe_dump(
        {"PERSIST": dict(DEFAULT_OPTIONS, MAX_TO_KEEP=2)}))
    (run / "model_0000004.pth").write_bytes(b"x")
    config["train"].update(max_iter=9, persist={"max_to_keep": 3})
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(config))
    d = diff(str(run), str(tmp_path / "more.yaml"))
    assert (d["config"], d["persist"]) == ({"train.max_iter": [5, 9]}, {"MAX_TO_KEEP": [2, 3]})


def test_a_file_that_cannot_be_read_is_not_taken_for_a_missing_one(run, mocker):
    """
    A manifest another user's umask left unreadable was reported as "no manifest.json: an
    incomplete export"; the real cause is the sentence now (root reads every file: injected).
    """
    from d2persist.__main__ import main

    (run / "export").mkdir()
    (run / "export" / "manifest.json").write_text("{}")
    real_open = open
    denied = str(run / "export" / "manifest.json")

    def deny(path, *args, **kwargs):
        if str(path) == denied:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    mocker.patch("d2persist.artifacts.folders.open", create=True, side_effect=deny)
    with pytest.raises(D2PersistError, match=f"^Cannot read {denied}: Permission denied.$"):
        open_view(str(run / "export")).manifest()
    with pytest.raises(SystemExit) as e:
        main(["verify", str(run)])
    assert e.value.code == 2


def test_a_remote_onnx_model_that_cannot_be_fetched_is_not_called_damaged(tmp_path, mocker):
    """
    verify of a bundle at a URL opens its ONNX model in ONNX Runtime from a download: a full
    temporary folder (or a failed download) was reported as the model not opening (DAMAGED,
    exit 1, the reason dropped); it is a note, the file checked by its sha256.
    """
    import errno
    import json

    import fsspec

    pytest.importorskip("onnxruntime")
    fs = fsspec.filesystem("memory")
    root = f"/d2persist-verify-{os.getpid()}-{tmp_path.name}"
    files = {"config.yaml": b"MODEL: {}\n", "model.safetensors": b"w", "model.onnx": b"graph"}
    manifest = {"format": {"name": "d2persist-export", "version": 1}, "config": "config.yaml",
                "weights": "model.safetensors", "input": {"format": "BGR"},
                "files": {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                          for n, d in files.items()}}
    for name, data in [*files.items(), ("manifest.json", json.dumps(manifest).encode())]:
        fs.pipe(f"{root}/{name}", data)
    try:
        mocker.patch.object(type(fs), "get_file",
                            side_effect=OSError(errno.ENOSPC, "No space left on device"))
        problems, notes = open_view(f"memory://{root}").verify()
    finally:
        fs.rm(root, recursive=True)
    assert problems == []
    assert len(notes) == 1 and notes[0].startswith(
        f"memory://{root}/model.onnx was checked against its sha256 only, not opened in ONNX "
        "Runtime (Cannot read"), notes
    assert "No space left on device" in notes[0]
