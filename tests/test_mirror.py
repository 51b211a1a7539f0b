"""
PERSIST.MIRROR against a real S3-compatible server (moto's server mode) on 127.0.0.1, through
s3fs configured the standard fsspec way. Every server a test starts, it stops.
"""

import contextlib
import logging
import os
import shutil

import pytest
import torch
from helpers import INFER_SINGLE, assert_bitwise_equal, run_tool, tiny_cfg, train

from d2persist.artifacts.checkpoints import verify_checkpoint

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "d2persist-test"


@contextlib.contextmanager
def s3_server():
    """A moto S3 server on 127.0.0.1, fsspec pointed at it (also for subprocesses)."""
    import fsspec
    import s3fs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1",
           "FSSPEC_S3_ENDPOINT_URL": f"http://{host}:{port}"}
    saved_env = {k: os.environ.get(k) for k in env}
    saved_conf = fsspec.config.conf.get("s3")
    os.environ.update(env)
    fsspec.config.conf["s3"] = {"endpoint_url": env["FSSPEC_S3_ENDPOINT_URL"]}
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        fs = fsspec.filesystem("s3")
        if not fs.exists(BUCKET):  # moto keeps its buckets per process, across servers
            fs.mkdir(BUCKET)
        yield server, env
    finally:
        server.stop()
        for k, v in saved_env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        fsspec.config.conf.pop("s3", None)
        if saved_conf is not None:
            fsspec.config.conf["s3"] = saved_conf
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3():
    with s3_server() as (server, env):
        yield env


def _fs():
    import fsspec

    return fsspec.filesystem("s3")


def _names(prefix):
    fs = _fs()
    fs.invalidate_cache()
    return sorted(p[len(f"{BUCKET}/{prefix}/"):] for p in fs.find(f"{BUCKET}/{prefix}"))


def test_mirror_holds_the_run_and_follows_retention(s3, tmp_path):
    url = f"s3://{BUCKET}/run1"
    train(tiny_cfg(tmp_path, "PERSIST.MIRROR", url, "PERSIST.MAX_TO_KEEP", 1,
                   "SOLVER.CHECKPOINT_PERIOD", 1, "SOLVER.MAX_ITER", 4))
    names = _names("run1")
    assert {"config.yaml", "persist.yaml", "metadata.json", "last_checkpoint",
            "model_0000003.pth", "model_0000003.pth.sha256", "model_final.pth",
            "model_final.pth.sha256", "export/manifest.json", "export/model.safetensors",
            "export/config.yaml", "training.png", "metrics.json"} == set(names)  # retention
    # removed
    # model_0000000..2 there too; training.png (PERSIST.PLOT) is mirrored like the rest
    fs = _fs()
    assert fs.cat_file(f"{BUCKET}/run1/last_checkpoint") == b"model_final.pth"
    for name in ("model_final.pth", "export/model.safetensors", "export/manifest.json"):
        assert fs.cat_file(f"{BUCKET}/run1/{name}") == (tmp_path / name).read_bytes()

    image = _val_image()
    res = run_tool(INFER_SINGLE, "--image", image, "--artifacts", f"{url}/export",
                   "--json", tmp_path / "p.json", env=s3)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "weights: the final weights, iteration 3" in res.stdout
    _look_at_the_mirror(url, tmp_path, s3)


def _d2persist(*args, env):
    return run_tool("-m", "d2persist", *args, env=env, timeout=120)


def _look_at_the_mirror(url, run, env):
    """``d2persist ls/verify/diff/plot`` read the mirror URL as they read the run folder."""
    import json

    local = json.loads(_d2persist("ls", run, "--json", env=env).stdout)
    assert local["mirror"] == {"url": url, "in_step": True, "missing": [],
                               "last_checkpoint": "model_final.pth", "error": None}
    res = _d2persist("ls", url, "--json", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    remote = json.loads(res.stdout)
    assert remote["kind"] == "run" and remote["export"]["complete"]
    assert [(r["name"], r["iteration"], r["size"], r["markers"], r["metrics"])
            for r in remote["checkpoints"]] == [
        (r["name"], r["iteration"], r["size"], r["markers"], r["metrics"])
        for r in local["checkpoints"]]
    res = _d2persist("verify", url, env=env)
    assert res.returncode == 0 and "everything verifies" in res.stdout, res.stdout + res.stderr
    res = _d2persist("diff", run, url, "--json", env=env)
    assert res.returncode == 0 and json.loads(res.stdout)["config"] == {}, res.stdout
    res = _d2persist("plot", url, "-o", run / "remote.png", env=env)
    assert res.returncode == 0 and (run / "remote.png").read_bytes()[:4] == b"\x89PNG"

    fs = _fs()  # damage at the mirror is named there; the local run is not touched
    data = bytearray(fs.cat_file(f"{BUCKET}/run1/model_final.pth"))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(f"{BUCKET}/run1/model_final.pth", bytes(data))
    fs.rm_file(f"{BUCKET}/run1/export/model.safetensors")
    res = _d2persist("verify", url, env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    problems = [ln for ln in res.stdout.splitlines() if ln.startswith("PROBLEM")]
    assert len(problems) == 3, res.stdout  # the checkpoint, last_checkpoint's target, the bundle
    assert f"{url}/model_final.pth: its sha256" in problems[0]
    assert f"{url}/export/model.safetensors named in manifest.json is missing" in res.stdout
    assert verify_checkpoint(str(run / "model_final.pth")) is None
    fs.rm_file(f"{BUCKET}/run1/model_final.pth")
    behind = json.loads(_d2persist("ls", run, "--json", env=env).stdout)["mirror"]
    assert not behind["in_step"] and behind["missing"] == ["model_final.pth"]
    res = _d2persist("ls", f"s3://{BUCKET}/nothing-here", env=env)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr


def _val_image():
    from detectron2.data import DatasetCatalog

    from d2persist.data.shapes import register_shapes

    _, val = register_shapes()
    return DatasetCatalog.get(val)[0]["file_name"]


def test_resume_from_the_mirror_into_an_empty_folder(s3, tmp_path):
    url = f"s3://{BUCKET}/run2"
    opts = ["PERSIST.EXPORT", False, "SOLVER.CHECKPOINT_PERIOD", 2]
    train(tiny_cfg(tmp_path / "straight", *opts, "SOLVER.MAX_ITER", 6))
    train(tiny_cfg(tmp_path / "lost", *opts, "SOLVER.MAX_ITER", 4, "PERSIST.MIRROR", url))
    shutil.rmtree(tmp_path / "lost")  # the machine is gone; a new one starts empty
    trainer = train(tiny_cfg(tmp_path / "new", *opts, "SOLVER.MAX_ITER", 6,
                             "PERSIST.MIRROR", url), resume=True)
    assert trainer.start_iter == 4
    assert_bitwise_equal(
        torch.load(tmp_path / "straight" / "model_final.pth", weights_only=True)["model"],
        torch.load(tmp_path / "new" / "model_final.pth", weights_only=True)["model"],
    )


def test_resume_from_the_mirror_brings_the_best_model(s3, tmp_path):
    """
    A run keeping its best model (exported from it), resumed from the mirror on a new machine:
    model_best.pth and best.json come with the checkpoint; the export is of the best weights.
    """
    import json

    from helpers import EVAL_OPTS, eval_trainer

    opts = [*EVAL_OPTS, "PERSIST.BEST_METRIC", "bbox/AP50", "PERSIST.EXPORT_FROM", "best",
            "PERSIST.MIRROR", f"s3://{BUCKET}/run7", "SOLVER.CHECKPOINT_PERIOD", 2,
            "SOLVER.MAX_ITER", 4]
    lost = tmp_path / "lost"
    train(tiny_cfg(lost, *opts), trainer_cls=eval_trainer())
    record = json.loads((lost / "best.json").read_text())
    best_bytes = (lost / "model_best.pth").read_bytes()
    shutil.rmtree(lost)  # the machine is gone; a new one starts empty
    new = tmp_path / "new"
    # nothing left to train: the export (not on the new machine) is of the best it downloaded
    assert train(tiny_cfg(new, *opts), resume=True, trainer_cls=eval_trainer()).start_iter == 4
    assert (new / "model_best.pth").read_bytes() == best_bytes
    assert verify_checkpoint(str(new / "model_best.pth")) is None
    assert json.loads((new / "best.json").read_text())["iteration"] == record["iteration"]
    manifest = json.loads((new / "export" / "manifest.json").read_text())
    assert (manifest["source"]["from"], manifest["iteration"]) == ("best", record["iteration"])


def test_an_export_written_again_is_incomplete_at_the_mirror_until_it_is_whole(
        s3, tmp_path, mocker):
    """
    A run exporting again (resumed for more iterations): the mirror's old manifest goes before
    any new file of the bundle is uploaded, so a reader there never takes the new files for
    the old manifest's (a download that does not match, blamed on damage); the new manifest
    comes last. A run killed before the mirror had its export whole, resumed once finished:
    the mirror gets it.
    """
    from d2persist.files.mirror import Mirror

    opts = ["PERSIST.MIRROR", f"s3://{BUCKET}/run6", "SOLVER.CHECKPOINT_PERIOD", 2]
    train(tiny_cfg(tmp_path, *opts, "SOLVER.MAX_ITER", 2))
    calls = []
    for op in ("put", "remove"):
        mocker.patch.object(Mirror, op, autospec=True, side_effect=lambda self, *a, op=op,
                            real=getattr(Mirror, op): (calls.append((op, a[-1])),
                                                       real(self, *a))[1])
    train(tiny_cfg(tmp_path, *opts, "SOLVER.MAX_ITER", 4), resume=True)
    final = [c for c in calls if c[1].startswith("model_final")]  # written again: the mirror's
    assert final[:2] == [("remove", "model_final.pth.sha256"), ("put", "model_final.pth")]
    export = [c for c in calls if c[1].startswith("export/")]
    assert export[0] == ("remove", "export/manifest.json"), export
    assert export[-1] == ("put", "export/manifest.json"), export
    assert ("put", "export/model.safetensors") in export
    fs = _fs()
    fs.invalidate_cache()  # the mirror ends as the run's own export
    local = (tmp_path / "export" / "manifest.json").read_bytes()
    assert fs.cat_file(f"{BUCKET}/run6/export/manifest.json") == local
    fs.rm_file(f"{BUCKET}/run6/export/manifest.json")  # killed between removal and upload
    mocker.stopall()
    train(tiny_cfg(tmp_path, *opts, "SOLVER.MAX_ITER", 4), resume=True)  # trains no further
    fs.invalidate_cache()
    assert fs.cat_file(f"{BUCKET}/run6/export/manifest.json") == local
    assert (tmp_path / "export" / "manifest.json").read_bytes() == local  # not exported again


def test_a_failed_upload_is_never_named_by_last_checkpoint(s3, tmp_path, mocker):
    from d2persist.files.mirror import Mirror

    real_put = Mirror.put

    def put(self, local, name):  # the upload of these dies, as with a killed process
        if name in ("model_0000003.pth", "model_final.pth"):
            raise ConnectionError("connection reset during upload")
        return real_put(self, local, name)

    mocker.patch.object(Mirror, "put", put)
    train(tiny_cfg(tmp_path, "PERSIST.MIRROR", f"s3://{BUCKET}/run3", "PERSIST.EXPORT", False,
                   "SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 2))
    fs = _fs()
    named = fs.cat_file(f"{BUCKET}/run3/last_checkpoint").decode()
    assert named == "model_0000001.pth"
    fs.get_file(f"{BUCKET}/run3/{named}", str(tmp_path / "fetched.pth"))
    fs.get_file(f"{BUCKET}/run3/{named}.sha256", str(tmp_path / "fetched.pth.sha256"))
    assert verify_checkpoint(str(tmp_path / "fetched.pth")) is None
    assert (tmp_path / "model_final.pth").is_file()  # the local run is whole


def test_retention_removes_from_the_mirror_only_after_a_newer_checkpoint_is_named(
        s3, tmp_path, mocker):
    """
    MAX_TO_KEEP 1 and the upload of model_0000003 failing: the mirror kept model_0000001
    until model_final was named there (it removed it when 0000003 was retired here, leaving
    a last_checkpoint naming nothing: a resume from it started a new run). A mirror whose
    last_checkpoint names a missing checkpoint refuses to resume, as a local folder does.
    """
    from d2persist import D2PersistError
    from d2persist.files.mirror import Mirror, Uploader

    url = f"s3://{BUCKET}/run8"
    real_put, held = Mirror.put, {}

    def put(self, local, name):
        if name == "model_0000003.pth":
            raise ConnectionError("connection reset during upload")
        if name == "model_final.pth":
            self.fs.invalidate_cache()  # (s3fs's listings are cached)
            held["before final"] = sorted(self.names())
        return real_put(self, local, name)

    mocker.patch.object(Mirror, "put", put)
    submit = Uploader.submit

    def in_order(self, steps):  # each job done before training goes on: model_0000001 is
        submit(self, steps)  # uploaded before retention removes it here (on a loaded machine
        self.wait()  # its job may find it gone: then the mirror never had it)

    mocker.patch.object(Uploader, "submit", in_order)
    opts = ["PERSIST.MIRROR", url, "PERSIST.EXPORT", False, "PERSIST.MAX_TO_KEEP", 1,
            "SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 2]
    train(tiny_cfg(tmp_path / "lost", *opts))
    assert "model_0000001.pth" in held["before final"], held
    assert not (tmp_path / "lost" / "model_0000001.pth").exists()  # retired here
    names = _names("run8")
    assert "model_0000001.pth" not in names and "model_final.pth" in names, names  # then there
    mocker.stopall()
    _fs().rm_file(f"{BUCKET}/run8/model_final.pth")  # the mirror names what is not there
    with pytest.raises(D2PersistError, match="Cannot resume: the mirror's last_checkpoint .* "
                       "names model_final.pth, which is not there"):
        train(tiny_cfg(tmp_path / "new", *opts), resume=True)


class _StopServerAt(__import__("detectron2.engine", fromlist=["HookBase"]).HookBase):
    def __init__(self, it, server):
        self.it, self.server = it, server

    def after_step(self):
        if self.trainer.iter == self.it:
            self.server.stop()


def test_server_stopped_mid_run_training_finishes_with_one_message(tmp_path, caplog):
    with s3_server() as (server, _):
        cfg = tiny_cfg(tmp_path, "PERSIST.MIRROR", f"s3://{BUCKET}/run4", "PERSIST.EXPORT",
                       False, "SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 1)
        with caplog.at_level(logging.INFO, logger="d2persist"):
            train(cfg, hooks=[_StopServerAt(1, server)])
    errors = [r for r in caplog.records if "Could not copy" in r.getMessage()]
    assert len(errors) == 1 and errors[0].levelname == "ERROR"
    assert any("upload(s) failed, the local run is complete" in r.getMessage()
               for r in caplog.records)
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert verify_checkpoint(str(tmp_path / "model_final.pth")) is None


def test_sigkill_while_uploading_leaves_a_mirror_naming_a_complete_checkpoint(s3, tmp_path):
    import time

    from helpers import TINY_OPTS, TRAIN_NET, kill_tree, start_tool

    url = f"s3://{BUCKET}/run5"
    args = [*TINY_OPTS, "SOLVER.MAX_ITER", 100, "SOLVER.CHECKPOINT_PERIOD", 1,
            "PERSIST.EXPORT", False, "PERSIST.MIRROR", url, "OUTPUT_DIR", tmp_path]
    proc = start_tool(TRAIN_NET, *args, env=s3)
    fs = _fs()
    try:
        deadline = time.monotonic() + 120
        while True:  # uploads are under way: a checkpoint is named in the mirror
            fs.invalidate_cache()
            if fs.exists(f"{BUCKET}/run5/last_checkpoint"):
                break
            assert proc.poll() is None and time.monotonic() < deadline, "nothing uploaded"
            time.sleep(0.2)
        time.sleep(1.0)  # one save per iteration: the next uploads are in flight
    finally:
        kill_tree(proc.pid)
        proc.wait()
    fs.invalidate_cache()
    named = fs.cat_file(f"{BUCKET}/run5/last_checkpoint").decode()
    fs.get_file(f"{BUCKET}/run5/{named}", str(tmp_path / "fetched.pth"))
    fs.get_file(f"{BUCKET}/run5/{named}.sha256", str(tmp_path / "fetched.pth.sha256"))
    assert verify_checkpoint(str(tmp_path / "fetched.pth")) is None


def test_urls_that_cannot_be_used_are_one_sentence(s3, tmp_path, mocker):
    from d2persist import D2PersistError, InputImageError, OutputPathError
    from d2persist.artifacts.view import open_view
    from d2persist.scale.batch import check_destination, list_source

    with pytest.raises(OutputPathError, match="there is no d2persist-no-such-bucket there"):
        check_destination("s3://d2persist-no-such-bucket/out")
    check_destination(f"s3://{BUCKET}/new-predictions")  # a new prefix of a bucket: fine
    _fs().pipe(f"{BUCKET}/lone/config.yaml", b"MODEL: {}\n")
    with pytest.raises(D2PersistError, match="config.yaml is a file, not a folder"):
        open_view(f"s3://{BUCKET}/lone/config.yaml")  # was read as a run that verifies
    denied = PermissionError("Access Denied")  # as s3fs raises for refused credentials
    mocker.patch.object(type(_fs()), "isdir", side_effect=denied)
    with pytest.raises(InputImageError, match=r"Cannot read s3://.*/images \(PermissionError: "
                                              "Access Denied\\)"):
        list_source(f"s3://{BUCKET}/images")
    mocker.patch.object(_fs(), "ls", side_effect=denied)  # (s3fs's sync methods: instance's)
    with pytest.raises(OutputPathError, match=r"Cannot write to s3://.*/out \(PermissionError"):
        check_destination(f"s3://{BUCKET}/out")


class _Sized:
    """A predictor's interface, predicting each image's size (fast)."""

    sha256, backend, precision = "0" * 64, "onnxruntime", "fp32"

    def __call__(self, data):
        import io

        from PIL import Image

        size = Image.open(io.BytesIO(data)).size
        return type("P", (), {"to_json": lambda self, image_name=None, min_score=0: {
            "image": image_name, "size": list(size)}})()


def test_a_destination_that_refuses_writes_ends_the_job_in_one_sentence(s3, tmp_path, mocker):
    """
    Credentials that may list and read the destination, not write it (s3fs's PermissionError
    has no errno): the job's record, then an image's output, refused; a traceback before,
    one sentence naming the URL now, and the rerun once writable finishes the job.
    """
    from PIL import Image

    from d2persist import OutputPathError
    from d2persist.files.mirror import Mirror
    from d2persist.scale.batch import predict_source

    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 6)).save(src / name)
    url = f"s3://{BUCKET}/refused"
    real = Mirror.put_bytes
    refuse = {"names": (".d2persist-predict.json",)}

    def put_bytes(self, data, name):
        if name.endswith(refuse["names"]):
            raise PermissionError("Access Denied")
        return real(self, data, name)

    mocker.patch.object(Mirror, "put_bytes", put_bytes)
    for names in ((".d2persist-predict.json",), ("b.png.json",)):
        refuse["names"] = names
        with pytest.raises(OutputPathError, match=rf"^Cannot write to {url} \(PermissionError: "
                                                  r"Access Denied\); what is written there is "
                                                  r"whole: run the same command again"):
            predict_source(_Sized(), str(src), url)
    mocker.stopall()
    record = predict_source(_Sized(), str(src), url)
    assert record["counts"] == {"inputs": 2, "done": 1, "skipped": 1, "failed": 0}
