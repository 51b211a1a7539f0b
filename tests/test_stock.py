"""
Drop-in: plain detectron2 code (no d2persist import in the recipe) works on a folder written
by PersistHook, and PersistHook continues a run that stock detectron2 started.
"""

import cv2
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.engine import DefaultPredictor, DefaultTrainer
from detectron2.modeling import build_model
from helpers import tiny_cfg

from d2persist import PersistTrainer, load_predictor
from d2persist.data.shapes import register_shapes


@pytest.fixture(scope="module")
def image():
    _, val = register_shapes()
    return cv2.imread(DatasetCatalog.get(val)[1]["file_name"])


def test_recipe_default_predictor_on_config_yaml(trained_run, image):
    cfg = get_cfg()
    cfg.merge_from_file(str(trained_run / "config.yaml"))
    cfg.MODEL.WEIGHTS = str(trained_run / "model_final.pth")
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    outputs = DefaultPredictor(cfg)(image)
    ours = load_predictor(str(trained_run), opts=["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    theirs, mine = outputs["instances"].to("cpu"), ours(image, channel_order="BGR").instances
    assert len(theirs) == len(mine) > 0
    torch.testing.assert_close(theirs.pred_boxes.tensor, mine.pred_boxes.tensor)


@pytest.mark.parametrize("name", ["model_0000001.pth", "model_0000003.pth", "model_final.pth"])
def test_recipe_detection_checkpointer_loads_any_checkpoint(trained_run, name):
    cfg = get_cfg()
    cfg.merge_from_file(str(trained_run / "config.yaml"))
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(trained_run / name))
    saved = torch.load(trained_run / name, weights_only=True)["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_recipe_stock_trainer_continues_a_d2persist_run(tmp_path):
    trainer = PersistTrainer(tiny_cfg(tmp_path, "SOLVER.MAX_ITER", 4, "PERSIST.EXPORT", False))
    trainer.resume_or_load(resume=False)
    trainer.train()
    cfg = get_cfg()
    cfg.merge_from_file(str(tmp_path / "config.yaml"))  # plain get_cfg, d2persist's config.yaml
    cfg.SOLVER.MAX_ITER = 6
    stock = DefaultTrainer(cfg)
    stock.resume_or_load(resume=True)
    assert stock.start_iter == 4
    stock.train()
    assert torch.load(tmp_path / "model_final.pth", weights_only=True)["iteration"] == 5


def test_persist_continues_a_stock_detectron2_run(tmp_path):
    cfg = tiny_cfg(tmp_path, "SOLVER.MAX_ITER", 4)
    stock = DefaultTrainer(cfg)  # no d2persist hook: detectron2's own checkpoints
    stock.resume_or_load(resume=False)
    stock.train()
    assert not list(tmp_path.glob("*.sha256"))
    more = PersistTrainer(tiny_cfg(tmp_path, "SOLVER.MAX_ITER", 6))
    more.resume_or_load(resume=True)
    assert more.start_iter == 4
    more.train()
    assert torch.load(tmp_path / "model_final.pth", weights_only=True)["iteration"] == 5
    assert (tmp_path / "export" / "manifest.json").is_file()


def test_readme_recipe_safetensors_with_plain_detectron2(trained_run):
    """The README's recipe: an export's weights in a model built from its config."""
    from safetensors.torch import load_file

    export = trained_run / "export"
    cfg = get_cfg()
    cfg.merge_from_file(str(export / "config.yaml"))
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg)
    model.load_state_dict(load_file(str(export / "model.safetensors")))  # strict: every key
    final = torch.load(trained_run / "model_final.pth", weights_only=True)["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, final[k]), k


def test_checkpointer_reads_model_zoo_pkl_arrays_but_no_code(trained_run, tmp_path):
    """MODEL.WEIGHTS may be a detectron2 model-zoo .pkl: numpy arrays are read, code is not."""
    import os
    import pickle

    from d2persist import PersistCheckpointer, UnsafeArtifactError

    cfg = get_cfg()
    cfg.merge_from_file(str(trained_run / "config.yaml"))
    source = torch.load(trained_run / "model_final.pth", weights_only=True)["model"]
    zoo = tmp_path / "model_zoo.pkl"
    with open(zoo, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in source.items()}, "__author__": "zoo"}, f)
    model = build_model(cfg)
    PersistCheckpointer(model).load(str(zoo))
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    hostile = tmp_path / "hostile.pkl"
    with open(hostile, "wb") as f:
        pickle.dump({"model": {"x": Payload()}, "__author__": "zoo"}, f)
    with pytest.raises(UnsafeArtifactError, match="posix.system|os.system"):
        PersistCheckpointer(build_model(cfg)).load(str(hostile))
    assert not marker.exists()


def test_checkpointer_reads_export_safetensors(trained_run):
    from d2persist import PersistCheckpointer

    cfg = get_cfg()
    cfg.merge_from_file(str(trained_run / "config.yaml"))
    model = build_model(cfg)
    PersistCheckpointer(model).load(str(trained_run / "export" / "model.safetensors"))
    source = torch.load(trained_run / "model_final.pth", weights_only=True)["model"]
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())


def test_a_stock_trainer_whose_hook_missed_its_state_or_trains_twice_is_refused(tmp_path):
    """
    PersistHook registered after ``resume_or_load(resume=True)``: detectron2 only logged that
    no hook took its state, and the run went on with its RNG, EMA and retention reset; a
    trainer's second ``train()`` retrained its iterations over its checkpoints. Both refused.
    """
    from d2persist import D2PersistError, PersistHook

    cfg = tiny_cfg(tmp_path, "SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 2,
                   "PERSIST.EXPORT", False, "PERSIST.EMA_DECAY", 0.9)
    first = DefaultTrainer(cfg)
    first.register_hooks([PersistHook(cfg)])
    first.resume_or_load(resume=False)
    first.train()
    more = tiny_cfg(tmp_path, "SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 2,
                    "PERSIST.EXPORT", False, "PERSIST.EMA_DECAY", 0.9)
    late = DefaultTrainer(more)
    late.resume_or_load(resume=True)
    late.register_hooks([PersistHook(more)])
    config = (tmp_path / "config.yaml").read_bytes()
    with pytest.raises(D2PersistError, match=r"^PersistHook was registered after resume_or_load: "
                                             r"the state it saved in .*model_final.pth"):
        late.train()
    assert not (tmp_path / "model_0000005.pth").exists()
    assert (tmp_path / "config.yaml").read_bytes() == config  # refused before writing
    ready = DefaultTrainer(more)  # registered first: it resumes
    ready.register_hooks([PersistHook(more)])
    ready.resume_or_load(resume=True)
    ready.train()
    assert torch.load(tmp_path / "model_final.pth", weights_only=True)["iteration"] == 5
    final = (tmp_path / "model_final.pth").read_bytes()
    with pytest.raises(D2PersistError, match=r"^This trainer has trained already \(train\(\) "
                                             r"called again\)"):
        ready.train()  # (no hook's after_train again: EvalHook's would fail on its own)
    assert (tmp_path / "model_final.pth").read_bytes() == final


def test_a_stock_trainer_resumed_past_max_iter_with_ema_eval_says_so(tmp_path):
    """The refusal of a resume past SOLVER.MAX_ITER ended in an AssertionError instead: the
    EMA swap before EvalHook's last evaluation, of an average never attached."""
    from helpers import train

    from d2persist import D2PersistError

    opts = ["PERSIST.EXPORT", False, "PERSIST.EMA_DECAY", 0.9, "PERSIST.EMA_EVAL", True]
    train(tiny_cfg(tmp_path, "SOLVER.MAX_ITER", 4, *opts), trainer_cls=DefaultTrainer)
    with pytest.raises(D2PersistError, match="MAX_ITER"):
        train(tiny_cfg(tmp_path, "SOLVER.MAX_ITER", 2, *opts), resume=True,
              trainer_cls=DefaultTrainer)


class _Counter:
    """A project's own state, saved with the checkpoints (``add_checkpointable``)."""

    def __init__(self):
        self.count, self.loaded = 0, None

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.loaded = dict(state)


def test_what_the_trainers_checkpointer_saves_besides_is_saved_too(tmp_path):
    """
    ``trainer.checkpointer.add_checkpointable`` (an EMA of a project's, its own counters): the
    hook's checkpoints left it out, and a resume restarted it without a word.
    """
    from d2persist import PersistHook

    cfg = tiny_cfg(tmp_path, "SOLVER.MAX_ITER", 3, "SOLVER.CHECKPOINT_PERIOD", 2,
                   "PERSIST.EXPORT", False)
    trainer, counter = DefaultTrainer(cfg), _Counter()
    counter.count = 7
    trainer.checkpointer.add_checkpointable("counter", counter)
    trainer.register_hooks([PersistHook(cfg)])
    trainer.resume_or_load(resume=False)
    trainer.train()
    for name in ("model_0000001.pth", "model_final.pth"):
        assert torch.load(tmp_path / name, weights_only=True)["counter"] == {"count": 7}
    more = tiny_cfg(tmp_path, "SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 2,
                    "PERSIST.EXPORT", False)
    again, restored = DefaultTrainer(more), _Counter()
    again.checkpointer.add_checkpointable("counter", restored)
    again.register_hooks([PersistHook(more)])
    again.resume_or_load(resume=True)
    assert restored.loaded == {"count": 7}


def test_a_persisttrainer_whose_hooks_leave_out_persisthook_is_refused(tmp_path):
    """A subclass's build_hooks not calling super(): it trained with nothing saved (no
    config.yaml, no checkpoint, no export) and a run lock never released."""
    from d2persist import D2PersistError

    class OwnHooks(PersistTrainer):
        def build_hooks(self):
            return []

    with pytest.raises(D2PersistError, match=r"^OwnHooks.build_hooks returns no PersistHook: "
                                             r"call super\(\).build_hooks\(\)"):
        OwnHooks(tiny_cfg(tmp_path, "SOLVER.MAX_ITER", 2))
