"""tools/infer_single.py: outputs, and one clear line + exit code 2 for every bad input."""

import json
import os
import pickle
import shutil

import cv2
import pytest
from detectron2.data import DatasetCatalog
from helpers import INFER_SINGLE, run_tool

from d2persist.data.shapes import register_shapes


@pytest.fixture(scope="module")
def val_images():
    _, val = register_shapes()
    return [d["file_name"] for d in DatasetCatalog.get(val)[:3]]


def assert_refused(res, *words):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("infer_single.py:")]
    assert len(lines) == 1, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_folder_of_images_writes_one_file_each(trained_run, val_images, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in val_images:
        shutil.copy(p, folder)
    (folder / "notes.txt").write_text("not an image, not picked up")
    res = run_tool(INFER_SINGLE, "--image", folder, "--artifacts", trained_run,
                   "--output", tmp_path / "vis", "--json", tmp_path / "json")
    assert res.returncode == 0, res.stderr[-2000:]
    names = sorted(os.path.basename(p)[:-4] for p in val_images)
    assert sorted(n[:-4] for n in os.listdir(tmp_path / "vis")) == names
    assert sorted(n[:-5] for n in os.listdir(tmp_path / "json")) == names
    data = json.loads((tmp_path / "json" / (names[0] + ".json")).read_text())
    assert set(data) == {"image", "height", "width", "instances"}
    assert "image/s" in res.stderr or "100%" in res.stderr  # the tqdm progress bar


@pytest.fixture()
def bad_images(tmp_path, val_images):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("hello, I am not a PNG")
    truncated = tmp_path / "truncated.png"
    data = open(val_images[0], "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    no_images = tmp_path / "no_images"
    no_images.mkdir()
    (no_images / "readme.txt").write_text("x")
    return {"missing": (tmp_path / "missing.png", "does not exist"),
            "empty": (empty, "empty"),
            "not an image": (text, "not an image"),
            "truncated": (truncated, "truncated"),
            "folder without images": (no_images, "holds no image")}


@pytest.mark.parametrize("case", ["missing", "empty", "not an image", "truncated",
                                  "folder without images"])
def test_bad_image_exits_2_with_one_line(trained_run, bad_images, tmp_path, case):
    path, words = bad_images[case]
    res = run_tool(INFER_SINGLE, "--image", path, "--artifacts", trained_run,
                   "--json", tmp_path / "out.json")
    assert_refused(res, words)
    assert not (tmp_path / "out.json").exists()


def test_folder_with_neither_export_nor_checkpoints(tmp_path, val_images):
    res = run_tool(INFER_SINGLE, "--image", val_images[0], "--artifacts", tmp_path)
    assert_refused(res, "neither an export", "nor checkpoints")


def test_tampered_bundle_is_refused(trained_run, tmp_path, val_images):
    bundle = tmp_path / "bundle"
    shutil.copytree(trained_run / "export", bundle)
    with open(bundle / "model.safetensors", "r+b") as f:
        f.seek(-100, os.SEEK_END)
        f.write(b"\x01" * 10)
    res = run_tool(INFER_SINGLE, "--image", val_images[0], "--artifacts", bundle)
    assert_refused(res, "does not match its sha256")


def test_manifest_cannot_point_outside_the_bundle(trained_run, tmp_path, val_images):
    bundle = tmp_path / "bundle"
    shutil.copytree(trained_run / "export", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "size": 1}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    res = run_tool(INFER_SINGLE, "--image", val_images[0], "--artifacts", bundle)
    assert_refused(res, "outside")


def _rewrite_manifest_entry(bundle, name):
    from d2persist.files.atomic import sha256_file

    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": sha256_file(str(bundle / name)),
                               "size": (bundle / name).stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_weights_that_do_not_fit_the_config(trained_run, tmp_path, val_images):
    bundle = tmp_path / "bundle"
    shutil.copytree(trained_run / "export", bundle)
    cfg = (bundle / "config.yaml").read_text().replace("NUM_CLASSES: 3", "NUM_CLASSES: 5")
    (bundle / "config.yaml").write_text(cfg)
    _rewrite_manifest_entry(bundle, "config.yaml")  # a consistent bundle, with wrong weights
    res = run_tool(INFER_SINGLE, "--image", val_images[0], "--artifacts", bundle)
    assert_refused(res, "do not fit")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_checkpoint_is_refused_and_nothing_runs(trained_run, tmp_path, val_images):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("export"))
    marker = tmp_path / "pwned"
    os.unlink(run / "model_final.pth.sha256")  # as a downloaded stock checkpoint would come
    with open(run / "model_final.pth", "wb") as f:  # the newest checkpoint, and hostile
        pickle.dump({"model": _Payload(marker)}, f)
    res = run_tool(INFER_SINGLE, "--image", val_images[0], "--artifacts", run)
    assert_refused(res, "Refusing to load", "model_final.pth")
    assert not marker.exists()


def test_hostile_yaml_is_refused_and_nothing_runs(trained_run, tmp_path, val_images):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("export"))
    marker = tmp_path / "pwned"
    cfg = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(
        f"EVIL: !!python/object/apply:os.system ['touch {marker}']\n" + cfg
    )
    res = run_tool(INFER_SINGLE, "--image", val_images[0], "--artifacts", run)
    assert_refused(res, "Refusing to load", "config.yaml")
    assert not marker.exists()


def test_resume_refuses_hostile_checkpoint(trained_run, tmp_path):
    from helpers import tiny_cfg

    from d2persist import PersistTrainer, UnsafeArtifactError

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    marker = tmp_path / "pwned"
    os.unlink(run / "model_final.pth")
    os.unlink(run / "model_final.pth.sha256")
    with open(run / "model_final.pth", "wb") as f:
        pickle.dump({"model": _Payload(marker)}, f)
    trainer = PersistTrainer(tiny_cfg(run))
    with pytest.raises(UnsafeArtifactError, match="Refusing to load"):
        trainer.resume_or_load(resume=True)
    assert not marker.exists()


def test_visualization_is_upscaled_when_small_and_original_size_when_large(
    trained_run, val_images, tmp_path
):
    small = cv2.imread(val_images[0])  # 128 px: drawn at 512 px, so labels are legible
    large = tmp_path / "large.png"
    cv2.imwrite(str(large), cv2.resize(small, (800, 600)))
    for image, shape in ((val_images[0], (512, 512, 3)), (large, (600, 800, 3))):
        res = run_tool(INFER_SINGLE, "--image", image, "--artifacts", trained_run / "export",
                       "--output", tmp_path / "v.png", "--json", tmp_path / "v.json")
        assert res.returncode == 0, res.stderr[-2000:]
        assert cv2.imread(str(tmp_path / "v.png")).shape == shape
        assert f"visualization: {tmp_path / 'v.png'}" in res.stdout


@pytest.mark.parametrize("export", [True, False])
def test_config_extensions_apply_when_predicting_in_a_fresh_process(tmp_path, export):
    """A project's add_*_config (which also registers its model) is applied by the predictor."""
    from helpers import tiny_cfg, train

    from tests.scripts.demo_ext import add_demo_config

    cfg = tiny_cfg(tmp_path, "SOLVER.MAX_ITER", 2, "PERSIST.EXPORT", export,
                   "PERSIST.CONFIG_EXTENSIONS", ["tests.scripts.demo_ext:add_demo_config"],
                   "MODEL.META_ARCHITECTURE", "DemoRCNN")
    add_demo_config(cfg)
    cfg.MODEL.DEMO.NOTE = "changed"
    train(cfg)
    _, val = register_shapes()
    image = DatasetCatalog.get(val)[0]["file_name"]
    res = run_tool(INFER_SINGLE, "--image", image, "--artifacts", tmp_path,
                   "--json", tmp_path / "p.json", fresh=True)  # nothing imported beforehand
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "p.json").read_text())["height"] > 0


def test_demo_summary_names_the_files_metrics_and_commands(tmp_path):
    import json

    from helpers import REPO

    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    rows = [{"iteration": 99, "total_loss": 1.0},
            {"iteration": 99, "bbox/AP": 50.0, "bbox/AP50": 80.0, "segm/AP": 51.0},
            {"iteration": 199, "bbox/AP": 61.25, "bbox/AP50": 90.5, "segm/AP": 62.0}]
    (run / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "best.json").write_text(json.dumps(
        {"metric": "segm/AP", "mode": "max", "value": 62.0, "iteration": 199}))
    (run / "log.txt").write_text("... Total training time: 0:01:52 (0:00:03 on hooks)\n")
    res = run_tool(f"{REPO}/tools/demo_summary.py", run, "--started", 0)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "bbox/AP 61.2, bbox/AP50 90.5, segm/AP 62.0" in out  # the last evaluation
    assert "segm/AP 62.0 after iteration 199" in out and "0:01:52" in out
    assert f"{run / 'demo' / 'prediction.png'} (missing)" in out
    assert f"--artifacts {run / 'export'} --backend onnxruntime" in out
    bad = run_tool(f"{REPO}/tools/demo_summary.py", tmp_path / "nowhere")
    assert bad.returncode == 2 and "nowhere does not exist" in bad.stderr
