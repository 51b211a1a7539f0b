"""
Bad input is one sentence and a non-zero exit, before any work, and loses nothing: outputs
that would land on an input, a file or a folder; options out of range; artifacts damaged in
ways a hash does not catch (a garbled sidecar, a damaged persist.yaml, an ONNX model whose
manifest entry was made to match it). No model is trained or loaded.
"""

import hashlib
import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

from d2persist.errors import (
    ArtifactError,
    D2PersistError,
    DatasetMismatchError,
    ExportError,
    OutputPathError,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _picture(path):
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(path)
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tool_parser(name):
    return _tool(name).get_parser()


def test_export_model_names_artifacts_that_do_not_exist(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        _tool("export_model").main(["--artifacts", str(tmp_path / "nowhere")])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().endswith("nowhere does not exist.")


@pytest.mark.parametrize("backend", ["pytorch", "onnxruntime"])
def test_artifacts_given_as_one_of_their_files_name_the_folder_to_give(tmp_path, backend):
    from d2persist import load_predictor

    checkpoint = tmp_path / "run" / "model_final.pth"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"weights")
    with pytest.raises(ArtifactError) as e:
        load_predictor(str(checkpoint), backend=backend)
    assert str(e.value) == (f"{checkpoint} is a file, not a folder: give the folder of the "
                            f"training run or of the export bundle that holds it "
                            f"({tmp_path / 'run'}).")


def test_export_model_finds_the_run_of_a_nested_export_and_refuses_a_budget_unused(
        tmp_path, capsys):
    tool = _tool("export_model")
    run = tmp_path / "run"
    bundle = run / "a" / "b"
    bundle.mkdir(parents=True)
    (bundle / "manifest.json").write_text("{}")
    (run / "persist.yaml").write_text("PERSIST:\n  EXPORT_DIR: a/b\n")
    (run / "last_checkpoint").write_text("model_final.pth")
    assert tool._run_of(str(bundle), str(bundle)) == str(run)  # its lock, its options
    assert tool._run_of(str(run), str(bundle)) == str(run)
    (run / "persist.yaml").write_text("PERSIST:\n  EXPORT_DIR: export\n")
    assert tool._run_of(str(bundle), str(bundle)) is None  # not its export: a bundle of its own
    with pytest.raises(SystemExit) as exit:
        tool.main(["--artifacts", str(bundle), "--no-eval", "--int8-budget", "0.5"])
    assert exit.value.code == 2 and capsys.readouterr().err == (
        "export_model.py: error: --int8-budget is how the evaluation judges INT8: without it "
        "(--no-eval) it would do nothing; drop one of them.\n")


def test_outputs_onto_an_input_a_file_or_each_other_are_refused_before_any_work(tmp_path):
    from d2persist.predict.infer import check_outputs, predict_files

    (tmp_path / "photos").mkdir()
    a, b = str(tmp_path / "photos" / "a.png"), str(tmp_path / "photos" / "b.png")
    digests = [_picture(a), _picture(b)]
    (tmp_path / "afile").write_text("mine")
    cases = [
        ([a, b], str(tmp_path / "photos"), None, True, "Output .*a.png is the input image"),
        ([a], a, None, False, "is the input image .*a.png: writing it would replace"),
        ([a, b], None, str(tmp_path / "afile"), True, "Output folder .*afile is a file"),
        ([a], None, str(tmp_path / "afile" / "x.json"), False, "afile is a file, not a folder"),
        ([a], str(tmp_path / "o.png"), str(tmp_path / "o.png"), False, "Two outputs .*o.png"),
        ([a], "s3://bucket/o.png", None, False, "is a URL: this writes files on this machine"),
        ([a, b], None, "s3://bucket/preds", True, "is a URL"),
        ([a], None, str(tmp_path), False, None),  # a folder for one image: a file in it
    ]
    for images, output, json_out, many, message in cases:
        if message is None:
            check_outputs(images, output, json_out, many)
            continue
        with pytest.raises(OutputPathError, match=message):
            check_outputs(images, output, json_out, many)
        with pytest.raises(OutputPathError, match=message):  # (no predictor is needed to refuse)
            predict_files(None, images, output, json_out, many=many)
    assert [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (a, b)] == digests
    assert (tmp_path / "afile").read_text() == "mine"
    assert not (tmp_path / "o.png").exists()


def test_an_output_folder_this_process_may_not_write_is_refused_before_any_work(
        tmp_path, mocker):
    """(root writes everywhere: the permission injected.) Was refused only once the model
    had loaded, naming a temporary file."""
    from d2persist.predict.infer import check_outputs

    a = str(tmp_path / "a.png")
    _picture(a)
    (tmp_path / "ro").mkdir()
    access = os.access
    mocker.patch("d2persist.files.atomic.os.access", side_effect=lambda p, mode: False if
                 p == str(tmp_path / "ro") else access(p, mode))
    for output, json_out in ((str(tmp_path / "ro" / "new" / "a.png"), None),
                             (None, str(tmp_path / "ro"))):
        with pytest.raises(OutputPathError, match=rf"^Cannot write {tmp_path / 'ro'}\S*: this "
                                                  rf"process may not write in {tmp_path / 'ro'}\."):
            check_outputs([a], output, json_out, False)
    check_outputs([a], str(tmp_path / "elsewhere.png"), None, False)


def test_the_tools_check_outputs_before_the_model_loads(tmp_path, capsys):
    from d2persist.__main__ import main

    infer_single = _tool("infer_single")
    image = str(tmp_path / "a.png")
    digest = _picture(image)
    nowhere = str(tmp_path / "no_artifacts")  # loading would fail: the outputs are refused first
    with pytest.raises(SystemExit) as exit:
        infer_single.main(["--image", image, "--artifacts", nowhere, "--output", image])
    assert exit.value.code == 2 and "is the input image" in capsys.readouterr().err
    assert hashlib.sha256(open(image, "rb").read()).hexdigest() == digest
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "job.json").write_text("{}")
    with pytest.raises(SystemExit) as exit:
        main(["predict", image, "--artifacts", nowhere, "--output", str(tmp_path / "theirs")])
    assert exit.value.code == 2 and "'job.json'" in capsys.readouterr().err


def test_options_out_of_range_are_argparse_errors(capsys):
    from d2persist.__main__ import get_parser

    predict = ["predict", "src", "--artifacts", "a", "--output", "o"]
    cases = [
        (predict + ["--workers", "0"], "--workers: expected a whole number of at least 1"),
        (predict + ["--cpus-per-worker", "-2"], "--cpus-per-worker: expected a number above 0"),
        (predict + ["--gpus-per-worker", "-1"], "--gpus-per-worker: expected a number of at"),
        (predict + ["--confidence-threshold", "7"],
         "--confidence-threshold: a confidence threshold is a number from 0 to 1, not '7'"),
        (predict + ["--confidence-threshold", "nan"], "from 0 to 1, not 'nan'"),
        (["serve", "b", "--port", "70000"], "--port: expected a port from 1 to 65535"),
        (["serve", "b", "--replicas", "-1"], "--replicas: expected a whole number"),
        (["serve", "b", "--max-bytes", "0"], "--max-bytes: expected a whole number"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit:
            get_parser().parse_args(argv)
        assert exit.value.code == 2
        assert message in capsys.readouterr().err
    args = get_parser().parse_args(predict + ["--confidence-threshold", "0", "--workers", "2"])
    assert (args.confidence_threshold, args.workers) == (0.0, 2)
    export_model = ["--artifacts", "a", "--calibration-images", "-1"]
    with pytest.raises(SystemExit):
        _tool_parser("export_model").parse_args(export_model)
    assert "--calibration-images: expected a whole number" in capsys.readouterr().err
    infer_single = ["--image", "x", "--artifacts", "a", "--confidence-threshold", "1.5"]
    with pytest.raises(SystemExit):
        _tool_parser("infer_single").parse_args(infer_single)
    assert "from 0 to 1, not '1.5'" in capsys.readouterr().err
    import argparse

    from d2persist.cli import add_launch_arguments

    for timeout in ("inf", "nan", "0"):  # (timedelta() raised OverflowError at launch)
        with pytest.raises(SystemExit):
            add_launch_arguments(argparse.ArgumentParser()).parse_args(
                ["--dist-timeout", timeout])
        assert "--dist-timeout: expected a number above 0" in capsys.readouterr().err


def test_plot_refuses_an_output_it_cannot_write_and_never_writes_into_the_run(
        tmp_path, capsys, monkeypatch):
    from d2persist.__main__ import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"iteration": 0, "total_loss": 1.0}) + "\n")
    (tmp_path / "afile").write_text("mine")
    for output, message in ((tmp_path, "is a folder: name a file"),
                            (tmp_path / "afile" / "p.png", "afile is a file, not a folder")):
        with pytest.raises(SystemExit) as exit:
            main(["plot", str(run), "-o", str(output)])
        assert exit.value.code == 2 and message in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert main(["plot", str(run)]) == 0
    assert (tmp_path / "training.png").is_file() and not (run / "training.png").exists()
    (run / "training.png").write_bytes(b"the run's own")
    monkeypatch.chdir(run)  # plot . from inside the run, or -o into it
    for argv in (["plot", "."], ["plot", str(run), "-o", str(run / "sub" / "p.png")]):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 2 and "which plot never writes into: name an output outside " \
            "it (-o FILE)." in capsys.readouterr().err
    assert (run / "training.png").read_bytes() == b"the run's own"
    assert sorted(os.listdir(run)) == ["metrics.json", "training.png"]
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(SystemExit) as exit:
        main(["plot", str(run), "-o", str(tmp_path / "q.png")])
    assert exit.value.code == 2 and capsys.readouterr().err == (
        "d2persist: error: d2persist plot draws with matplotlib, which is not installed here: "
        "pip install matplotlib.\n")


def test_a_file_the_machine_refuses_is_one_sentence_naming_it(tmp_path, capsys, mocker):
    """A full disk (or a permission, a read-only disk) while a tool writes: exit 2, no traceback."""
    import errno

    from d2persist.__main__ import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"iteration": 0, "total_loss": 1.0}) + "\n")
    out = tmp_path / "p.png"
    for code, said in ((errno.ENOSPC, "No space left on device (every file written before is "
                        "whole; make room, then run the same command again)."),
                       (errno.EROFS, "Read-only file system.")):
        mocker.patch("d2persist.artifacts.plot.atomic_path",
                     side_effect=OSError(code, os.strerror(code), str(out)))
        with pytest.raises(SystemExit) as exit:
            main(["plot", str(run), "-o", str(out)])
        assert exit.value.code == 2
        assert capsys.readouterr().err == f"d2persist: error: {out}: {said}\n"
    mocker.patch("d2persist.artifacts.plot.atomic_path", side_effect=OSError(errno.EIO, "I/O"))
    with pytest.raises(OSError):  # not a file the user named: a failure, with its traceback
        main(["plot", str(run), "-o", str(out)])


def test_commands_on_ray_without_ray_are_one_sentence_before_the_model_loads(
        tmp_path, capsys, monkeypatch):
    import sys

    from d2persist.__main__ import main

    for module in ("ray.serve", "ray.data"):  # as where 'd2persist[ray]' was not installed
        monkeypatch.setitem(sys.modules, module, None)
    nowhere = str(tmp_path / "nowhere")  # (the artifacts would be refused after)
    for argv, what in ((["serve", nowhere], "d2persist serve"),
                       (["predict", str(tmp_path), "--artifacts", nowhere, "--output",
                         str(tmp_path / "out"), "--ray"], "d2persist predict --ray")):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.startswith(f"d2persist: error: {what} runs on Ray")
        assert err.endswith("pip install 'd2persist[ray]'.\n") and "Traceback" not in err


def test_a_garbled_sidecar_and_a_damaged_persist_yaml_are_named_by_verify(tmp_path):
    from d2persist.artifacts.checkpoints import verify_checkpoint
    from d2persist.artifacts.view import open_view

    run = tmp_path / "run"
    run.mkdir()
    (run / "model_final.pth").write_bytes(b"weights")
    (run / "model_final.pth.sha256").write_text("garbage\n")
    (run / "config.yaml").write_text("MODEL: {}\n")
    (run / "persist.yaml").write_text("PERSIST: [\n")
    want = "its sidecar model_final.pth.sha256 holds no sha256 (damaged)"
    assert verify_checkpoint(str(run / "model_final.pth")).startswith(want)
    view = open_view(str(run))
    problems, _ = view.verify()
    sentences = [p.sentence for p in problems]
    assert any(want in s for s in sentences), sentences
    assert any(p.path.endswith("persist.yaml") and p.kind == "damaged" for p in problems)
    export = view.export()  # what ls shows: the export's place is unknown, and why
    assert export["folder"] is None and "persist.yaml is not valid YAML" in export["problem"]
    assert view.mirror() is None
    with pytest.raises(ArtifactError, match="persist.yaml is not valid YAML"):
        view.export_dir()  # what prediction from it reads: refused, not the default folder
    digest = hashlib.sha256(b"weights").hexdigest()
    (run / "model_final.pth.sha256").write_text(digest.upper() + "  model_final.pth\n")
    assert verify_checkpoint(str(run / "model_final.pth")) is None


def test_a_bundle_whose_manifest_does_not_read_says_why_in_ls(tmp_path):
    from d2persist.artifacts.view import open_view

    (tmp_path / "manifest.json").write_text('{"format": ')
    export = open_view(str(tmp_path)).export()
    assert export["complete"] is False and "is not valid JSON" in export["problem"]


def test_an_onnx_model_that_does_not_open_is_one_sentence(tmp_path, monkeypatch):
    from d2persist.predict.onnx_predictor import create_session

    monkeypatch.setenv("D2PERSIST_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x08\x07" + b"not a graph" * 10)
    sha256 = hashlib.sha256(model.read_bytes()).hexdigest()
    for cache in (False, True):
        with pytest.raises(ArtifactError, match=r"model.onnx does not open in ONNX Runtime \("):
            create_session(str(model), sha256, cache=cache)
    left = [n for _, _, names in os.walk(tmp_path / "cache") for n in names]
    assert left == []  # no optimized graph, no temp file


def test_a_graph_that_cannot_be_cached_is_not_blamed_on_the_model(
        tmp_path, monkeypatch, mocker, caplog):
    import onnx
    from onnx import TensorProto, helper

    import onnxruntime as ort
    from d2persist.predict import onnx_predictor

    monkeypatch.setenv("D2PERSIST_CACHE", str(tmp_path / "cache"))
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    real = ort.InferenceSession
    fail = ort.capi.onnxruntime_pybind11_state.Fail

    def saving_fails(path, opts=None, **kw):  # as a full disk fails ONNX Runtime's save
        if opts is not None and opts.optimized_model_filepath:
            raise fail("Failed to save the optimized model")
        return real(path, opts, **kw)

    mocker.patch.object(ort, "InferenceSession", saving_fails)
    session, cached = onnx_predictor.create_session(str(model), "0" * 64)
    assert cached is False and session.get_inputs()[0].name == "x"
    assert "Cannot cache the optimized ONNX Runtime graph" in caplog.text


def test_int8_without_calibration_images_leaves_the_bundle_as_it_was(tmp_path):
    from d2persist.export.bundle import add_int8

    (tmp_path / "manifest.json").write_text('{"as": "it was"}')
    with pytest.raises(ExportError, match="needs calibration images, and none were given"):
        add_int8(str(tmp_path), [])
    assert (tmp_path / "manifest.json").read_text() == '{"as": "it was"}'


def test_thresholds_and_categories_that_cannot_work_are_one_sentence():
    from d2persist.predict.evaluate import match_categories
    from d2persist.predict.outputs import min_score_of

    assert min_score_of("0.25") == 0.25 and min_score_of(1) == 1.0
    for bad in ("7", -1, "nan", None, "high"):
        with pytest.raises(D2PersistError, match="a number from 0 to 1"):
            min_score_of(bad)
    with pytest.raises(DatasetMismatchError, match="has no categories to score the bundle's "
                                                   r"classes \(circle, square\) against\."):
        match_categories([], ["circle", "square"])


def _memory_bundle(root, files):
    import fsspec

    fs = fsspec.filesystem("memory")
    manifest = {"format": {"name": "d2persist-export", "version": 1}, "config": "config.yaml",
                "weights": "model.safetensors", "input": {"format": "BGR"},
                "files": {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                          for n, d in files.items()}}
    for name, data in files.items():
        fs.pipe(f"{root}/{name}", data)
    fs.pipe(f"{root}/manifest.json", json.dumps(manifest).encode())
    return fs


def test_a_bundle_url_is_cached_whole_per_version_and_a_damaged_one_never(
        tmp_path, monkeypatch, mocker):
    from d2persist.artifacts.manifest import local_bundle
    from d2persist.artifacts.view import RunView

    monkeypatch.setenv("D2PERSIST_CACHE", str(tmp_path / "cache"))
    root = f"/d2persist-test-{os.getpid()}-{tmp_path.name}/export"
    url = f"memory://{root}"
    config = b"MODEL: {}\n"
    fs = _memory_bundle(root, {"config.yaml": config, "model.safetensors": b"w" * 100})
    downloads = mocker.spy(RunView, "download")
    first = local_bundle(url)
    assert sorted(os.listdir(first)) == ["config.yaml", "manifest.json", "model.safetensors"]
    assert local_bundle(url) == first and downloads.call_count == 2  # cached: nothing again
    _memory_bundle(root, {"config.yaml": config, "model.safetensors": b"v" * 100})
    second = local_bundle(url)  # a new version beside the first, which stays whole
    assert second != first and open(os.path.join(second, "model.safetensors"), "rb").read() \
        == b"v" * 100 and open(os.path.join(first, "model.safetensors"), "rb").read() == b"w" * 100
    assert downloads.call_count == 3  # the config was the same bytes: reused, not downloaded
    _memory_bundle(root, {"config.yaml": config, "model.safetensors": b"u" * 100})
    fs.pipe(f"{root}/model.safetensors", b"x" * 100)  # damaged there: not what its entry says
    with pytest.raises(ArtifactError, match=f"{url}/model.safetensors does not match its "
                                            r"manifest entry \(sha256\)"):
        local_bundle(url)
    versions = os.path.dirname(first)
    assert sorted(os.listdir(versions)) == sorted([os.path.basename(first),
                                                   os.path.basename(second)])
    fs.rm(f"{root}/model.safetensors")  # missing there: refused before anything is downloaded
    with pytest.raises(ArtifactError, match="model.safetensors"):
        local_bundle(url)
    _memory_bundle(root, {"config.yaml": config, "model.safetensors": b"v" * 100})
    damaged = os.path.join(second, "model.safetensors")  # damaged in the cache, since
    os.unlink(damaged)  # (a new file: the first version's link to config.yaml is not touched)
    open(damaged, "wb").write(b"z" * 100)
    assert local_bundle(url) == second  # set aside and made again, whole
    assert open(damaged, "rb").read() == b"v" * 100
    for version in (first, second):  # the file a new version would reuse, damaged in each
        shared = os.path.join(version, "config.yaml")
        os.unlink(shared)
        open(shared, "wb").write(b"MODEL: {x}\n")
    calls = downloads.call_count
    _memory_bundle(root, {"config.yaml": config, "model.safetensors": b"t" * 100})
    third = local_bundle(url)  # not reused: downloaded (the damage is here, not at the URL)
    assert open(os.path.join(third, "config.yaml"), "rb").read() == config
    assert downloads.call_count == calls + 2  # the config and the new weights
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(second).st_mode & 0o777 == 0o777 & ~umask  # (mkdtemp's would be 0700)
    fs.rm(root, recursive=True)


def test_datasets_with_nothing_to_score_or_entries_missing_are_refused_before_predicting(
        tmp_path):
    import types

    from d2persist.errors import InputImageError
    from d2persist.predict import evaluate as ev

    (tmp_path / "img").mkdir()
    _picture(str(tmp_path / "img" / "a.png"))
    image = {"id": 1, "file_name": "a.png", "height": 8, "width": 8}
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "area": 16,
           "iscrowd": 0}
    cats = [{"id": 1, "name": "circle"}]

    def coco(**dataset):
        path = tmp_path / f"coco{len(list(tmp_path.glob('coco*.json')))}.json"
        path.write_text(json.dumps({"images": [image], "annotations": [ann], "categories": cats,
                                    **dataset}))
        return str(path)

    root = str(tmp_path / "img")
    cases = [(coco(images=[]), DatasetMismatchError, "lists no images"),
             (coco(annotations=[]), DatasetMismatchError, "holds no annotations"),
             (coco(annotations=[dict(ann, category_id=7)]), ArtifactError,
              "annotates only category ids its categories do not declare \\(such as 7\\)"),
             (coco(images=[{"id": 1, "height": 8, "width": 8}]), ArtifactError,
              "image 1 has no file_name")]
    results = tmp_path / "results.json"  # what COCOEvaluator writes: a list of detections
    results.write_text(json.dumps([{"image_id": 1, "category_id": 1, "score": 0.5}]))
    cases.append((str(results), ArtifactError, "a list is a results file"))
    for path, kind, message in cases:
        with pytest.raises(kind, match=message):
            ev.check_coco_dataset(path, root)
    _, images = ev.check_coco_dataset(coco(), root)
    assert images == [(1, os.path.join(root, "a.png"))]

    class Never:  # a predictor that must not be called: the data is refused first
        metadata = {"stuff_classes": ["a", "b"], "thing_classes": []}
        class_names = ["circle"]

        def __call__(self, image):
            raise AssertionError("predicted before the dataset was checked")

    with pytest.raises(DatasetMismatchError, match="holds no annotations"):
        ev.evaluate_coco(Never(), coco(annotations=[]), root)
    panoptic = tmp_path / "panoptic.json"
    (tmp_path / "pan").mkdir()
    for dataset, message in (({"images": [image], "categories": []}, "no annotations"),
                             ({"images": [{"file_name": "a.png"}], "categories": [],
                               "annotations": []}, "no 'id' of image 0")):
        panoptic.write_text(json.dumps(dataset))
        with pytest.raises(ArtifactError, match=message):
            ev.evaluate_panoptic(Never(), str(panoptic), str(tmp_path / "pan"), root)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.png").write_bytes(b"not a png")
    zeros = types.SimpleNamespace(arrays=types.SimpleNamespace(sem_seg=np.zeros((8, 8), int)))
    semantic = Never()
    semantic.__class__ = type("Semantic", (Never,), {"__call__": lambda self, image: zeros})
    with pytest.raises(InputImageError, match="Label .*a.png is not a PNG that reads"):
        ev.evaluate_sem_seg(semantic, str(tmp_path / "labels"), root)


def test_an_export_without_its_manifest_does_not_verify_as_a_run(tmp_path):
    from d2persist.artifacts.view import open_view

    (tmp_path / "config.yaml").write_text("MODEL: {}\n")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    problems, _ = open_view(str(tmp_path)).verify()
    assert [(p.kind, p.path) for p in problems] == [
        ("incomplete", str(tmp_path / "model.safetensors"))]
    assert "holds model.safetensors but no manifest.json" in problems[0].sentence


def test_a_bundle_url_whose_manifest_does_not_read_says_why(tmp_path, monkeypatch, mocker):
    from d2persist.artifacts.manifest import local_bundle

    monkeypatch.setenv("D2PERSIST_CACHE", str(tmp_path / "cache"))
    root = f"/d2persist-test-{os.getpid()}-{tmp_path.name}/export"
    fs = _memory_bundle(root, {"config.yaml": b"MODEL: {}\n", "model.safetensors": b"w"})
    fs.pipe(f"{root}/manifest.json", b'{"format": ')
    with pytest.raises(ArtifactError, match=r"holds no complete export bundle \(manifest.json\)"
                                            ": .*manifest.json is not valid JSON"):
        local_bundle(f"memory://{root}")
    _memory_bundle(root, {"config.yaml": b"MODEL: {}\n", "model.safetensors": b"w"})
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("D2PERSIST_CACHE", str(tmp_path / "a_file"))  # the cache, not the bundle
    with pytest.raises(ArtifactError, match="Cannot write the bundle cache in .*a_file/bundles/"
                                            ".*; set D2PERSIST_CACHE to a folder"):
        local_bundle(f"memory://{root}")
    # the cache's disk full while a file downloads into it: the cache is named, not the URL
    import errno

    from d2persist.artifacts.view import RunView

    monkeypatch.setenv("D2PERSIST_CACHE", str(tmp_path / "cache"))
    full = OSError(errno.ENOSPC, "No space left on device")
    mocker.patch.object(RunView, "download", side_effect=full)
    with pytest.raises(ArtifactError, match=r"^Cannot write the bundle cache in .*cache/"
                                            r"bundles/.*No space left on device.*; set "
                                            "D2PERSIST_CACHE to a folder"):
        local_bundle(f"memory://{root}")
    fs.rm(root, recursive=True)


def test_a_model_part_no_module_registers_is_one_sentence():
    """A project's own architecture whose module is not imported (or a typo in its name)."""
    from d2persist.predict.rebuild import build_model_from_config

    with pytest.raises(ArtifactError) as e:
        build_model_from_config({"MODEL": {"META_ARCHITECTURE": "MyRCNN"}}, "yacs")
    assert "\n" not in str(e.value) and str(e.value).startswith(
        "The config names a model part that no imported module registers (No object named "
        "'MyRCNN' found in 'META_ARCH' registry!): fix the name, or list")
