"""
``d2persist predict``: a source of images predicted into a destination, each exactly once, as
``infer_single`` predicts it; resumable; from and to a real S3-compatible server (moto).
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import time

import pytest
from detectron2.data import DatasetCatalog
from helpers import INFER_SINGLE, REPO, kill_tree, run_tool

from d2persist import D2PersistError, load_predictor
from d2persist.data.shapes import register_shapes
from d2persist.scale.batch import list_source, predict_source


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """src/a/{0,1,2}.png, src/b/3.jpg (copies of val images), and src/b/bad.png (not one)."""
    _, val = register_shapes()
    files = [d["file_name"] for d in DatasetCatalog.get(val)[:4]]
    src = tmp_path_factory.mktemp("batch") / "src"
    for i, f in enumerate(files):
        folder = src / ("a" if i < 3 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, folder / f"{i}{os.path.splitext(f)[1] if i < 3 else '.jpg'}")
    (src / "b" / "bad.png").write_bytes(b"not an image")
    (src / "notes.txt").write_text("not listed: not an image ending")
    return src


def _json(path):
    return json.loads(path.read_text())


def test_a_folder_predicted_once_each_as_infer_single_predicts(trained_run, source, tmp_path):
    dst = tmp_path / "dst"
    args = ["-m", "d2persist", "predict", source, "--artifacts", trained_run, "--output", dst,
            "--backend", "pytorch", "--confidence-threshold", 0.2]
    res = run_tool(*args)
    assert res.returncode == 1, res.stderr[-3000:]  # one image could not be read
    assert "4 predicted, 0 done before, 1 could not be read" in res.stdout
    images = sorted(str(p.relative_to(source)) for p in source.rglob("*")
                    if p.suffix in (".png", ".jpg") and p.name != "bad.png")
    assert images == ["a/0.png", "a/1.png", "a/2.png", "b/3.jpg"]
    ref = tmp_path / "ref.json"  # the bytes infer_single writes for the same image
    out = run_tool(INFER_SINGLE, "--image", source / images[0], "--artifacts", trained_run,
                   "--json", ref, "--backend", "pytorch", "--confidence-threshold", 0.2)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (dst / (images[0] + ".json")).read_text() == ref.read_text()
    predictor = load_predictor(str(trained_run), backend="pytorch")
    for rel in images:
        data = predictor(str(source / rel)).to_json(image_name=str(source / rel), min_score=0.2)
        assert _json(dst / (rel + ".json")) == data
    error = _json(dst / "b" / "bad.png.error.json")
    assert error["path"] == str(source / "b" / "bad.png") and "not an image" in error["error"]
    job = _json(dst / "job.json")
    assert job["counts"] == {"inputs": 5, "done": 4, "skipped": 0, "failed": 1}
    assert (job["backend"], job["precision"], job["confidence_threshold"]) == (
        "pytorch", "float", 0.2)
    assert job["weights_sha256"] == predictor.sha256 and len(predictor.sha256) == 64

    # the same command again: nothing is predicted twice (what failed is tried again)
    stamps = {p: p.stat().st_mtime_ns for p in dst.rglob("*.json")
              if p.name != "job.json" and not p.name.endswith(".error.json")}
    again = run_tool(*args)
    assert again.returncode == 1 and "0 predicted, 4 done before" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # another job into the same destination: refused in one sentence, nothing touched
    other = run_tool(*args[:-1], 0.5)
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1].endswith(
        "(confidence_threshold 0.2, this one 0.5): predict into another --output, or remove "
        "it first.")
    assert "Traceback" not in other.stderr
    # so is another source with images of the same names
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(source, elsewhere)
    moved = run_tool(*args[:3], elsewhere, *args[4:])
    assert moved.returncode == 2 and "(src " in moved.stderr, moved.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_an_interrupted_job_finishes_with_only_the_rest(trained_run, source, tmp_path):
    predictor = load_predictor(str(trained_run), backend="pytorch")
    calls = []

    class Killed(BaseException):
        pass

    def dies_at_the_third(image):
        calls.append(image)
        if len(calls) == 3:
            raise Killed  # as if the process ended here: outputs 1 and 2 are written
        return predictor(image)

    dies_at_the_third.visualizer_metadata = predictor.visualizer_metadata
    for name in ("sha256", "backend", "precision"):
        setattr(dies_at_the_third, name, getattr(predictor, name))
    dst = tmp_path / "dst"
    with pytest.raises(Killed):
        predict_source(dies_at_the_third, str(source), str(dst), pictures=True)
    assert not (dst / "job.json").exists()  # not finished
    assert sorted(p.name for p in dst.rglob("*.png.json")) == ["0.png.json", "1.png.json"]
    calls.clear()
    record = predict_source(dies_at_the_third, str(source), str(dst), pictures=True)
    assert record["counts"] == {"inputs": 5, "done": 2, "skipped": 2, "failed": 1}
    # each called with the image's bytes; bad.png fails its check, the predictor not called
    assert calls == [(source / "a" / "2.png").read_bytes(), (source / "b" / "3.jpg").read_bytes()]
    assert all((dst / (rel + ".png")).is_file() for rel in ("a/0.png", "a/2.png", "b/3.jpg"))


def test_sources_name_their_outputs_relative_to_themselves(source, tmp_path, mocker):
    glob = list_source(str(source / "a" / "*.png"))
    assert [n for _, n in glob.items] == ["0.png", "1.png", "2.png"]
    listing = source / "list.txt"  # relative paths, a URL, a comment, a missing image
    listing.write_text(f"a/1.png\n# a comment\nfile://{source}/b/3.jpg\na/gone.png\n")
    try:
        listed = list_source(str(listing))
    finally:
        listing.unlink()
    assert [n for _, n in listed.items] == ["a/1.png", "b/3.jpg"]
    assert listed.missing == [(str(source / "a" / "gone.png"), "a/gone.png")]
    with pytest.raises(D2PersistError, match="does not exist"):
        list_source(str(tmp_path / "nowhere"))
    # "../": named as under the folder above (was "../b/3.jpg": an output outside --output,
    # never found by a rerun); whether each is there: one listing per folder, not a request
    # per line (a million lines in a bucket)
    import fsspec

    listing = source / "a" / "list.txt"
    listing.write_text("0.png\n1.png\n../b/3.jpg\n../b/gone.png\n")
    fs = fsspec.filesystem("file")
    ls, isfile = mocker.spy(type(fs), "ls"), mocker.spy(type(fs), "isfile")
    try:
        listed = list_source(str(listing))
    finally:
        listing.unlink()
    assert [n for _, n in listed.items] == ["a/0.png", "a/1.png", "b/3.jpg"]
    assert listed.missing == [(str(source / "b" / "gone.png"), "b/gone.png")]
    assert ls.call_count == 2  # and one isfile for the list file, one for what is not listed
    assert [c.args[1] for c in isfile.call_args_list] == [str(listing),
                                                          str(source / "b" / "gone.png")]


def test_from_and_to_s3(trained_run, source, tmp_path):
    from test_mirror import BUCKET, s3_server

    import fsspec

    with s3_server():
        fs = fsspec.filesystem("s3")
        fs.put(str(source / "a"), f"{BUCKET}/images/a", recursive=True)
        predictor = load_predictor(str(trained_run), backend="pytorch")
        record = predict_source(predictor, f"s3://{BUCKET}/images/", f"s3://{BUCKET}/preds")
        assert record["counts"] == {"inputs": 3, "done": 3, "skipped": 0, "failed": 0}
        fs.invalidate_cache()
        for i in range(3):
            got = json.loads(fs.cat_file(f"{BUCKET}/preds/a/{i}.png.json"))
            assert got["image"] == f"s3://{BUCKET}/images/a/{i}.png"
            ref = predictor(str(source / "a" / f"{i}.png")).to_json(min_score=0.5)
            assert {k: v for k, v in got.items() if k != "image"} == {
                k: v for k, v in ref.items() if k != "image"}
        assert json.loads(fs.cat_file(f"{BUCKET}/preds/job.json"))["counts"]["done"] == 3


def test_device_cuda_with_onnxruntime_needs_its_cuda_provider(trained_run):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(D2PersistError, match="needs ONNX Runtime's CUDAExecutionProvider"):
        load_predictor(str(trained_run), backend="onnxruntime", device="cuda")


def test_a_job_on_ray_is_described_on_its_driver_without_its_model(default_run, mocker):
    """
    ``predict --ray``'s driver only describes the predictor its actors load (the job's
    identity; a cluster's driver may lack their GPUs): the same sha256, backend, precision and
    weights as the loaded predictor's, with no model built and no ONNX Runtime session made;
    from a bundle's URL, with nothing downloaded but the manifest.
    """
    from d2persist.predict.load import describe_predictor

    run = str(default_run[0])
    kinds = [("pytorch", "float"), ("onnxruntime", "float"), ("onnxruntime", "int8")]
    loaded = {k: load_predictor(run, backend=k[0], precision=k[1]) for k in kinds}
    mocker.patch("d2persist.predict.predictor.build_model_from_config",
                 side_effect=AssertionError("a model built"))
    mocker.patch("onnxruntime.InferenceSession", side_effect=AssertionError("a session made"))
    for (backend, precision), predictor in loaded.items():
        spec = describe_predictor(run, backend=backend, precision=precision)
        assert (spec.sha256, spec.backend, spec.precision, spec.weights) == (
            predictor.sha256, predictor.backend, predictor.precision, predictor.weights)
    assert len({p.sha256 for p in loaded.values()}) == 3  # three files
    assert describe_predictor(run).backend == "pytorch"  # "auto", resolved here
    # a bundle's URL, described for a cluster (``here=False``): by its manifest alone, the
    # nodes download the bundle (a head node need not hold its hundreds of MB)
    import fsspec
    from test_mirror import BUCKET, s3_server

    from d2persist.artifacts.view import RunView

    download = mocker.patch.object(RunView, "download", side_effect=AssertionError("download"))
    with s3_server():
        fsspec.filesystem("s3").put(os.path.join(run, "export"), f"{BUCKET}/described",
                                    recursive=True)
        url = f"s3://{BUCKET}/described"
        for (backend, precision), predictor in loaded.items():
            spec = describe_predictor(url, backend=backend, precision=precision, here=False)
            assert (spec.sha256, spec.backend, spec.precision, spec.weights) == (
                predictor.sha256, predictor.backend, predictor.precision, predictor.weights)
        with pytest.raises(AssertionError, match="download"):  # (here: downloaded to load)
            describe_predictor(url, backend="onnxruntime")
        # what the nodes would refuse, refused here before Ray starts, in one sentence
        fs = fsspec.filesystem("s3")
        manifest = json.loads(fs.cat_file(f"{BUCKET}/described/manifest.json"))
        fs.rm_file(f"{BUCKET}/described/model.onnx")  # (an upload cut short)
        with pytest.raises(D2PersistError, match=r"^Bundle file s3://\S+/model.onnx named in "
                                                 r"manifest.json is missing\.$"):
            describe_predictor(url, backend="pytorch", here=False)
        for key, value, said in [
                ("sha256", None, r"gives model.safetensors no sha256: the bundle cannot be "
                                 r"verified\.$"),
                ("config_extensions", ["os:system"], r"os:system")]:
            changed = json.loads(json.dumps(manifest))
            del changed["files"]["model.onnx"]
            if key == "sha256":
                del changed["files"]["model.safetensors"]["sha256"]
            else:
                changed[key] = value
            fs.pipe_file(f"{BUCKET}/described/manifest.json", json.dumps(changed).encode())
            with pytest.raises(D2PersistError, match=said):
                describe_predictor(url, backend="pytorch", here=False)
    assert download.call_count == 1


def test_weights_replaced_while_they_load_are_refused_not_predicted_with(
        default_run, tmp_path, mocker, monkeypatch):
    """
    A bundle exported again (a resumed run finishing) or a run's newest checkpoint written
    again while a predictor loads it: the file loaded would not be the file verified, whose
    sha256 the predictor reports (a job's identity, ``/healthz``). Refused in one sentence
    with PyTorch and ONNX Runtime, and ONNX Runtime's graph of the new file is not cached
    under the old file's sha256.
    """
    import onnxruntime

    from d2persist.predict import predictor as torch_predictor

    bundle, run = tmp_path / "export", tmp_path / "run"
    shutil.copytree(os.path.join(default_run[0], "export"), bundle)
    run.mkdir()  # a run folder of checkpoints (its newest, linked: cheap)
    for name in ("config.yaml", "persist.yaml", "metadata.json", "model_final.pth",
                 "model_final.pth.sha256"):
        os.link(os.path.join(default_run[0], name), run / name)
    monkeypatch.setenv("D2PERSIST_CACHE", str(tmp_path / "cache"))

    def replace(path):  # a new file under the name (the same bytes here: another inode)
        new = path.with_name(path.name + ".new")
        new.write_bytes(path.read_bytes())
        os.replace(new, path)

    def refused(path):
        return rf"^{re.escape(str(path))} was replaced while it was being loaded \(a new " \
            r"export or checkpoint written meanwhile\): load it again\.$"

    build = torch_predictor.build_model_from_config
    for weights in (bundle / "model.safetensors", run / "model_final.pth"):
        mocker.patch.object(torch_predictor, "build_model_from_config",
                            side_effect=lambda *a, **k: (replace(weights), build(*a, **k))[1])
        with pytest.raises(D2PersistError, match=refused(weights)):
            load_predictor(str(weights.parent), backend="pytorch")
    mocker.stopall()
    from d2persist.artifacts import view

    verify = view.verify_checkpoint  # replaced just after it verified, before anything else
    mocker.patch.object(view, "verify_checkpoint", side_effect=lambda path: (
        verify(path), replace(run / "model_final.pth"))[0])
    with pytest.raises(D2PersistError, match=refused(run / "model_final.pth")):
        load_predictor(str(run), backend="pytorch")
    mocker.stopall()
    session = onnxruntime.InferenceSession
    mocker.patch("onnxruntime.InferenceSession", side_effect=lambda *a, **k: (
        session(*a, **k), replace(bundle / "model.onnx"))[0])
    with pytest.raises(D2PersistError, match=refused(bundle / "model.onnx")):
        load_predictor(str(bundle), backend="onnxruntime")
    assert not list((tmp_path / "cache").rglob("*.onnx"))  # no graph under the old sha256
    mocker.stopall()
    for path, backend in ((bundle, "pytorch"), (run, "pytorch"), (bundle, "onnxruntime")):
        assert load_predictor(str(path), backend=backend).backend == backend  # left alone


def test_copies_load_the_checkpoint_their_driver_described_not_a_newer_one(
        default_run, tmp_path):
    """
    Predicting or serving from a run folder still training: the driver describes its newest
    checkpoint, and each Ray actor or replica (the loader the command builds) loads that one,
    though the run has written a newer one since; one the run's retention removed since is
    refused in one sentence.
    """
    from d2persist.__main__ import _loader, get_parser
    from d2persist.predict.load import describe_predictor

    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "persist.yaml", "metadata.json", "model_0000019.pth",
                 "model_0000019.pth.sha256"):
        os.link(os.path.join(default_run[0], name), run / name)
    spec = describe_predictor(str(run), backend="pytorch")
    for name in ("model_final.pth", "model_final.pth.sha256"):  # the run goes on
        os.link(os.path.join(default_run[0], name), run / name)
    load = _loader(get_parser().parse_args(["serve", str(run)]), spec.backend, spec.sha256)
    copy = load(threads=None)
    assert copy.sha256 == spec.sha256 and copy.weights.endswith("iteration 19")
    assert load_predictor(str(run), backend="pytorch").sha256 != spec.sha256  # the newest
    for name in ("model_0000019.pth", "model_0000019.pth.sha256"):  # the run's retention
        os.unlink(run / name)
    with pytest.raises(D2PersistError, match=rf"^{re.escape(str(run))} no longer holds a "
                                             rf"checkpoint with sha256 {spec.sha256[:12]}… that "
                                             r"verifies \(the run's retention removed it\): "
                                             r"start again\.$"):
        load(threads=None)


def test_a_job_on_its_own_ray_refuses_what_this_machine_lacks(default_run, source, tmp_path):
    """
    The Ray a job starts is this machine and cannot grow: a worker asking for a GPU it does
    not have is refused in one sentence (Ray waited for it forever), as is ``--device cuda``
    with ONNX Runtime's CPU build (checked here before Ray starts). ``--ray`` alone starts a
    Ray of its own even where ``RAY_ADDRESS`` names another (here one that does not answer,
    where Ray's default address waited for it).
    """
    import onnxruntime
    import torch

    if torch.cuda.is_available() or "CUDAExecutionProvider" in \
            onnxruntime.get_available_providers():
        pytest.skip("this machine has a GPU")
    from helpers import free_port

    dst, elsewhere = tmp_path / "dst", f"127.0.0.1:{free_port()}"
    job = ["-m", "d2persist", "predict", source, "--artifacts", default_run[0], "--output", dst,
           "--backend", "onnxruntime", "--ray"]
    for flags, said in ((["--gpus-per-worker", 1], "A worker asks for 1 GPU, and the Ray "
                         "started for it on this machine has 0."),
                        (["--device", "cuda"], "Device cuda with the onnxruntime backend "
                         "needs ONNX Runtime's CUDAExecutionProvider")):
        res = run_tool(*job, *flags, timeout=120, env={"RAY_ADDRESS": elsewhere})
        assert res.returncode == 2, res.stderr[-3000:]
        assert res.stderr.strip().splitlines()[-1].startswith(f"d2persist: error: {said}")
        assert "Traceback" not in res.stderr
    assert not [p for p in dst.rglob("*") if p.is_file() and not p.name.startswith(".")]


def test_an_image_ray_cannot_read_is_an_error_record_not_the_end_of_the_job(
        default_run, source, tmp_path, mocker):
    """
    An image removed after the job listed its source: Ray Data's reader ended the whole job
    (a traceback), and every rerun the same way, the image never done. Now it gets its error
    record, as on this machine's engine, and the others are predicted, each once.
    """
    import functools

    from d2persist.predict.load import describe_predictor
    from d2persist.scale import batch

    src = tmp_path / "src"
    shutil.copytree(source, src)
    listed = batch.list_source

    def list_then_remove(url):
        found = listed(url)
        os.unlink(src / "a" / "1.png")  # (the source changed meanwhile)
        return found

    mocker.patch.object(batch, "list_source", side_effect=list_then_remove)
    run = str(default_run[0])
    spec = describe_predictor(run, backend="onnxruntime")
    engine = batch.RayEngine(functools.partial(load_predictor, run, backend="onnxruntime"),
                             workers=1, cpus_per_worker=1)
    record = predict_source(spec, str(src), str(tmp_path / "dst"), ray=engine)
    assert record["counts"] == {"inputs": 5, "done": 3, "skipped": 0, "failed": 2}
    error = _json(tmp_path / "dst" / "a" / "1.png.error.json")
    assert error == {"path": str(src / "a" / "1.png"),
                     "error": f"Image {src / 'a' / '1.png'} does not exist."}
    assert sorted(p.name for p in (tmp_path / "dst").rglob("*.json")) == [
        ".d2persist-predict.json", "0.png.json", "1.png.error.json", "2.png.json",
        "3.jpg.json", "bad.png.error.json", "job.json"]


def test_onnxruntime_threads_of_ray_replicas_do_not_spin(default_run):
    """
    Ray's actors and replicas share their cores: their ONNX Runtime threads yield them; a
    PyTorch one's threads (the process's) are its share.
    """
    from d2persist.__main__ import _loader, get_parser

    key = "session.intra_op.allow_spinning"
    run = str(default_run[0])
    shared = load_predictor(run, backend="onnxruntime", threads=2, spin=False)
    assert shared.session.get_session_options().get_session_config_entry(key) == "0"
    alone = load_predictor(run, backend="onnxruntime", threads=2)
    with pytest.raises(RuntimeError):  # ONNX Runtime's default: its threads spin
        alone.session.get_session_options().get_session_config_entry(key)
    # what serve loads in each replica (predict --ray's actors: the two-node test below)
    args = get_parser().parse_args(["serve", run])
    assert _loader(args, "onnxruntime").keywords["spin"] is False
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _loader(args, "pytorch")(threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _tail(f):
    f.seek(0)
    return f.read()[-3000:]


def _written(fs, folder):
    """``{image: its JSON's time}`` of the images predicted into the S3 ``folder``."""
    fs.invalidate_cache()
    try:
        found = fs.find(folder, detail=True)
    except FileNotFoundError:
        return {}
    return {p[len(folder) + 1:-len(".json")]: info["LastModified"] for p, info in found.items()
            if p.endswith(".json") and not p.endswith((".error.json", "/job.json"))
            and not os.path.basename(p).startswith(".")}


@contextlib.contextmanager
def _two_ray_nodes(port, env):
    """
    A Ray cluster of two nodes on loopback, one CPU each: ``ray start --head --block`` on
    ``port`` and a worker node, each a child of this test, started in turn once the one before
    says it is up, in a Ray temp folder of their own (``RAY_TMPDIR``: its
    ``ray_current_cluster`` names them, not /tmp/ray's, which a later ``ray.init()`` here
    would follow). Yields ``env`` with that folder, for the drivers. On the way out each node
    is SIGTERMed (it stops its processes), and what is left of its process group after 30 s
    SIGKILLed: ``ray stop`` would stop every Ray on the machine, not only these.
    """
    import signal
    import subprocess
    import sys
    import tempfile

    from helpers import tool_env

    folder = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths
    env = dict(env, RAY_TMPDIR=folder)

    ray_cli = [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]
    node = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats",
            "--block"]
    nodes = []
    try:
        for args in (["--head", "--port", str(port), "--include-dashboard", "false"],
                     ["--address", f"127.0.0.1:{port}"]):
            log = tempfile.TemporaryFile("w+")
            nodes.append((subprocess.Popen([*ray_cli, "start", *args, *node], stdout=log,
                                           stderr=subprocess.STDOUT, env=tool_env(**env),
                                           start_new_session=True), log))
            deadline = time.monotonic() + 120
            while "Ray runtime started" not in _tail(log):
                assert nodes[-1][0].poll() is None and time.monotonic() < deadline, _tail(log)
                time.sleep(0.2)
        yield env
    finally:
        for proc, log in reversed(nodes):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            kill_tree(proc.pid)
            proc.wait()
            log.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_two_node_ray_cluster_from_and_to_s3_survives_a_killed_worker(default_run, source):
    """
    ``--ray ADDRESS --workers 2 --cpus-per-worker 1`` on a cluster of two nodes on loopback
    (``ray start --head`` and a worker node, one CPU each: an actor on each), the images read
    from and the outputs written to the moto S3 server, with ONNX Runtime (the actors import no
    torch). One actor's worker process SIGKILLs itself at its second image (fault injection,
    tests/scripts/ray_fault.py): Ray restarts it and retries, and every image has one output,
    equal to this machine's predictor's. Then the driver of a second job is SIGKILLed after
    its first output: the same command again predicts only the rest. A job with the bundle at
    an S3 URL and no ``--cpus-per-worker``: its driver reads only the manifest, and its worker
    reserves one node's CPU, not the driver's two. A job and ``serve`` with ``--device cuda``
    (the driver leaves the device to the nodes, which have no CUDA here) end in one sentence
    naming the node, nothing predicted; so does a job whose bundle at its URL is replaced
    after its driver read it, before the actors load it. The two nodes are stopped at the end.
    """
    import subprocess
    import sys

    import fsspec
    from helpers import free_port, tool_env
    from test_mirror import BUCKET, s3_server

    run, _ = default_run
    fault = os.path.join(REPO, "tests", "scripts", "ray_fault.py")
    port = free_port()
    marker = source.parent / "killed"
    with s3_server() as (_, s3_env):
        fs = fsspec.filesystem("s3")
        fs.put(str(source), f"{BUCKET}/two/images", recursive=True)
        env = dict(s3_env, RAY_AUTH_MODE="disabled")  # (a token would be one more file)
        with _two_ray_nodes(port, env) as env:
            res = run_tool(fault, run, f"s3://{BUCKET}/two/images/", f"s3://{BUCKET}/two/preds",
                           marker, f"127.0.0.1:{port}", "onnxruntime", env=env, timeout=240,
                           fresh=True)
            # the driver SIGKILLed mid-job (a second per image), then the same command again
            again = [fault, run, f"s3://{BUCKET}/two/images/", f"s3://{BUCKET}/two/again",
                     marker, f"127.0.0.1:{port}", "onnxruntime"]
            with open(source.parent / "driver.err", "w+") as err:
                driver = subprocess.Popen([sys.executable, *map(str, again), "1.5"],
                                          stdout=subprocess.DEVNULL, stderr=err,
                                          env=tool_env(**env), start_new_session=True)
                try:
                    deadline = time.monotonic() + 120
                    while not _written(fs, f"{BUCKET}/two/again"):  # killed after the first
                        assert driver.poll() is None, _tail(err)
                        assert time.monotonic() < deadline, "no image predicted in 120 s"
                        time.sleep(0.2)
                finally:
                    kill_tree(driver.pid)
                    driver.wait()
            # the job's actors may finish the image they hold until Ray ends them: what is
            # there once nothing has been written for 4 s
            before, quiet = _written(fs, f"{BUCKET}/two/again"), time.monotonic()
            while time.monotonic() - quiet < 4:
                assert time.monotonic() < deadline + 60, "outputs still appear a minute on"
                time.sleep(0.5)
                now = _written(fs, f"{BUCKET}/two/again")
                if now != before:
                    before, quiet = now, time.monotonic()
            rerun = run_tool(*again, env=env, timeout=240, fresh=True)
            # the bundle at a URL, no CPUs given: the driver reads its manifest alone (a node
            # downloads it), and the worker reserves what a node has, not the driver's two
            # cores (which no node has: the job waited for one)
            fs.put(os.path.join(str(run), "export"), f"{BUCKET}/two/bundle", recursive=True)
            driver_cache = source.parent / "driver-cache"
            by_url = run_tool("-m", "d2persist", "predict", f"s3://{BUCKET}/two/images/",
                              "--artifacts", f"s3://{BUCKET}/two/bundle", "--output",
                              f"s3://{BUCKET}/two/url", "--ray", f"127.0.0.1:{port}",
                              "--backend", "onnxruntime", timeout=240,
                              env=dict(env, D2PERSIST_CACHE=str(driver_cache)))
            # the bundle at the URL replaced once the driver has read it (a new export, as a
            # nightly job writes one), before the actors load it: the job ends in one sentence,
            # nothing written (its outputs would come from two models under one identity); the
            # same command again is another job's (the destination refused)
            fs.put(os.path.join(str(run), "export"), f"{BUCKET}/two/swapped", recursive=True)
            swap = [f"s3://{BUCKET}/two/images/", "--artifacts", f"s3://{BUCKET}/two/swapped",
                    "--output", f"s3://{BUCKET}/two/swap", "--ray", f"127.0.0.1:{port}",
                    "--backend", "onnxruntime"]
            swapped = run_tool(os.path.join(REPO, "tests", "scripts", "ray_swap.py"), *swap,
                               env=env, timeout=240)
            fs.invalidate_cache()
            left = [os.path.basename(p) for p in fs.find(f"{BUCKET}/two/swap")]
            swapped_sha = json.loads(fs.cat_file(f"{BUCKET}/two/swap/.d2persist-predict.json"))[
                "weights_sha256"]
            swapped_again = run_tool("-m", "d2persist", "predict", *swap, env=env, timeout=240)
            # a cluster's driver leaves the device to the nodes: one that cannot give it
            # ends the job in one sentence naming it (ONNX Runtime's CPU build: no CUDA)
            refused = run_tool("-m", "d2persist", "predict", f"s3://{BUCKET}/two/images/",
                               "--artifacts", run, "--output", f"s3://{BUCKET}/two/cuda",
                               "--ray", f"127.0.0.1:{port}", "--workers", 2,
                               "--cpus-per-worker", 1, "--backend", "onnxruntime",
                               "--device", "cuda", env=env, timeout=240)
            # and serve's replicas alike, Serve's start given up
            # (the replica's CPUs as the worker's above: the cluster's share, one node's)
            unserved = run_tool("-m", "d2persist", "serve", run, "--ray", f"127.0.0.1:{port}",
                                "--port", free_port(), "--backend", "onnxruntime",
                                "--device", "cuda", env=env, timeout=240)
        assert res.returncode == 0, res.stderr[-4000:]
        said = json.loads(res.stdout.strip().splitlines()[-1])
        assert said["engine"] == {"address": f"127.0.0.1:{port}", "workers": 2,
                                  "cpus_per_worker": 1.0, "spin": False}
        assert said["record"]["engine"] == {"name": "ray", "address": f"127.0.0.1:{port}",
                                            "workers": 2, "cpus_per_worker": 1.0,
                                            "gpus_per_worker": 0.0}
        assert marker.read_text().endswith(" threads=1")  # a worker, loaded so, was killed
        assert said["record"]["counts"] == {"inputs": 5, "done": 4, "skipped": 0, "failed": 1}
        fs.invalidate_cache()
        outputs = sorted(p[len(f"{BUCKET}/two/preds/"):] for p in fs.find(f"{BUCKET}/two/preds"))
        assert outputs == [".d2persist-predict.json", "a/0.png.json", "a/1.png.json",
                           "a/2.png.json", "b/3.jpg.json", "b/bad.png.error.json", "job.json"]
        predictor = load_predictor(str(run), backend="onnxruntime")
        for rel in ("a/0.png", "a/1.png", "a/2.png", "b/3.jpg"):
            got = json.loads(fs.cat_file(f"{BUCKET}/two/preds/{rel}.json"))
            url = f"s3://{BUCKET}/two/images/{rel}"
            assert got == predictor(str(source / rel)).to_json(image_name=url, min_score=0.5)
        error = json.loads(fs.cat_file(f"{BUCKET}/two/preds/b/bad.png.error.json"))
        assert error["path"] == f"s3://{BUCKET}/two/images/b/bad.png"
        assert error["error"].startswith(f"s3://{BUCKET}/two/images/b/bad.png ")  # as listed
        # the rerun after the driver was killed predicted only the rest, each image once
        assert rerun.returncode == 0, rerun.stderr[-4000:]
        counts = json.loads(rerun.stdout.strip().splitlines()[-1])["record"]["counts"]
        assert 1 <= len(before) < 4 and counts == {
            "inputs": 5, "done": 4 - len(before), "skipped": len(before), "failed": 1}
        images = {"a/0.png", "a/1.png", "a/2.png", "b/3.jpg"}
        assert set(_written(fs, f"{BUCKET}/two/again")) == images
        for rel in before:  # not written again
            assert fs.info(f"{BUCKET}/two/again/{rel}.json")["LastModified"] == before[rel]
        for rel in ("a/0.png", "a/1.png", "a/2.png", "b/3.jpg"):
            assert fs.cat_file(f"{BUCKET}/two/again/{rel}.json") == fs.cat_file(
                f"{BUCKET}/two/preds/{rel}.json")
        assert by_url.returncode == 1, by_url.stderr[-3000:]  # (b/bad.png)
        assert "4 predicted on Ray (1 worker(s) x 1 CPU(s))" in by_url.stdout, by_url.stdout
        assert not (driver_cache / "bundles").exists()  # (the nodes' cache has it)
        for rel in images:
            assert fs.cat_file(f"{BUCKET}/two/url/{rel}.json") == fs.cat_file(
                f"{BUCKET}/two/preds/{rel}.json")
        assert swapped.returncode == 2, swapped.stderr[-3000:]
        refusal = swapped.stderr.strip().splitlines()[-1]
        assert re.fullmatch(r"d2persist: error: On Ray's node [\w.:-]+: The artifacts changed "
                            r"after the driver read them: this copy loaded weights with sha256 "
                            r"[0-9a-f]{12}\.\.\., not [0-9a-f]{12}\.\.\.; predict into another "
                            r"--output to use the new ones\.", refusal), swapped.stderr[-3000:]
        assert "Traceback" not in swapped.stderr
        assert left == [".d2persist-predict.json"]  # nothing predicted by the other model
        new = hashlib.sha256(fs.cat_file(f"{BUCKET}/two/swapped/model.onnx")).hexdigest()
        with open(os.path.join(str(run), "export", "model.onnx"), "rb") as f:
            assert swapped_sha == hashlib.sha256(f.read()).hexdigest() != new  # as described
        assert swapped_again.returncode == 2 and swapped_again.stderr.strip().splitlines()[
            -1].endswith(f"holds another job's record, and no output yet (weights_sha256 "
                         f"'{swapped_sha}', this one '{new}'): predict into another --output, "
                         "or remove it first."), swapped_again.stderr[-3000:]
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            return  # the nodes can give it
        for res in (refused, unserved):
            assert res.returncode == 2, res.stderr[-3000:]
            assert re.fullmatch(r"d2persist: error: On Ray's node [\w.:-]+: Device cuda with the "
                                r"onnxruntime backend needs ONNX Runtime's CUDAExecutionProvider"
                                r" .*", res.stderr.strip().splitlines()[-1]), res.stderr[-3000:]
            assert "Traceback" not in res.stderr
        fs.invalidate_cache()
        assert [os.path.basename(p) for p in fs.find(f"{BUCKET}/two/cuda")] == [
            ".d2persist-predict.json"]  # nothing predicted: a rerun on GPU nodes does it all


def test_a_job_on_its_own_ray_ends_as_sigterm_ends_a_process(default_run, source, tmp_path):
    """
    SIGTERM to the driver of a job on the local Ray it started (Kubernetes' stop, a preempted
    machine's notice): Ray is shut down and the driver then ends by SIGTERM, as it would
    without Ray (not by the C++ handler ``ray.init`` installs, which printed a stack and
    skipped ``ray.shutdown()``); the outputs written stay whole, the job unfinished.
    """
    import signal
    import subprocess
    import sys

    from helpers import tool_env

    fault = os.path.join(REPO, "tests", "scripts", "ray_fault.py")
    marker = tmp_path / "no-kill"
    marker.write_text("")  # ray_fault.py kills no worker once its marker exists
    dst = tmp_path / "dst"
    with open(tmp_path / "driver.err", "w+") as err:
        driver = subprocess.Popen(  # 3 s per image: SIGTERM comes mid-job
            [sys.executable, fault, str(default_run[0]), str(source), str(dst), str(marker),
             "local", "onnxruntime", "3.0"],
            stdout=subprocess.DEVNULL, stderr=err, env=tool_env(), start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not list(dst.rglob("*.png.json")):
                assert driver.poll() is None, _tail(err)
                assert time.monotonic() < deadline, "no image predicted in 120 s"
                time.sleep(0.2)
            driver.send_signal(signal.SIGTERM)
            driver.wait(timeout=60)
            said = _tail(err)
        finally:
            kill_tree(driver.pid)
            driver.wait()
    assert driver.returncode == -signal.SIGTERM, said
    assert "SIGTERM received" not in said and "Traceback" not in said, said
    assert (tmp_path / "no-kill.shutdown").is_file()  # Ray shut down before the end
    assert not (dst / "job.json").exists()
    written = [p for p in dst.rglob("*.json") if not p.name.startswith(".")]
    assert 1 <= len(written) < 5 and all(isinstance(_json(p), dict) for p in written)
