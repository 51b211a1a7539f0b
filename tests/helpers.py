"""
Tiny real-detectron2 configs for tests: the built-in config on the built-in shapes data, with
images resized to 64 px, batch 2, a few iterations, on the CPU.
"""

import contextlib
import os
import sys

from detectron2.config import get_cfg

from d2persist import add_persist_config
from d2persist.data.shapes import KEYPOINT_OKS_SIGMAS, SHAPE_KEYPOINTS, register_shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "shapes_mask_rcnn_R_18_FPN.yaml")
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
INFER_SINGLE = os.path.join(REPO, "tools", "infer_single.py")

#: Overrides that make the built-in config tiny (as KEY VALUE pairs, also for the CLI).
TINY_OPTS = [
    "DATASETS.TEST", "()",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "96",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "96",
    "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "32",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "32",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.BASE_LR", "0.01",
    "SOLVER.WARMUP_ITERS", "2",
    "SOLVER.STEPS", "()",
    "SOLVER.MAX_ITER", "6",
    "SOLVER.CHECKPOINT_PERIOD", "2",
    "DATALOADER.NUM_WORKERS", "0",
    "TEST.EVAL_PERIOD", "0",
    "SEED", "7",
    "PERSIST.EXPORT_FORMATS", "['safetensors']",  # the tests that need ONNX ask for it
    "PERSIST.BEST_METRIC", "",  # no evaluation (DATASETS.TEST is empty): no best
]


def tiny_cfg(output_dir, *opts):
    """The built-in config, made tiny, writing into ``output_dir``; ``opts`` override it."""
    register_shapes()
    cfg = get_cfg()
    add_persist_config(cfg)
    cfg.merge_from_file(DEFAULT_CONFIG)
    cfg.merge_from_list(TINY_OPTS + ["OUTPUT_DIR", str(output_dir)] + list(opts))
    return cfg


def train(cfg, resume=False, hooks=(), trainer_cls=None):
    """
    Train ``cfg`` on a real trainer, seeded as tools/train_net.py's setup seeds; returns it.

    Args:
        trainer_cls: PersistTrainer (None), or a stock DefaultTrainer, given a PersistHook here.
        hooks: more hooks, registered after the trainer's own.
    """
    from detectron2.engine import DefaultTrainer
    from detectron2.utils.env import seed_all_rng

    from d2persist import PersistHook, PersistTrainer

    seed_all_rng(cfg.SEED)
    trainer = (trainer_cls or PersistTrainer)(cfg)
    if trainer_cls is DefaultTrainer:
        trainer.register_hooks([PersistHook(cfg)])
    trainer.register_hooks(list(hooks))
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


def assert_bitwise_equal(a, b):
    """Two dicts of tensors hold the same keys and bitwise equal values."""
    import torch

    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


_FORK_SERVER = []  # the session's ForkServer, once a tool run started it


def fork_server():
    """The session's :class:`forkserver.ForkServer` (started on first use)."""
    if not _FORK_SERVER:
        from forkserver import ForkServer

        _FORK_SERVER.append(ForkServer(tool_env(), REPO))
    return _FORK_SERVER[0]


def stop_fork_server():
    if _FORK_SERVER:
        _FORK_SERVER.pop().close()


#: what a forked tool run may set beyond the fork server's environment: variables read while the
#: tool runs (torch's thread count the server applies itself; fsspec's and botocore's, which the
#: server does not import); anything else starts a fresh interpreter, since a module the server
#: imported may have read it already
_FORKABLE_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HOLD_AT", "HOLD_UNTIL", "STOP_AT",
                 "AWS_", "FSSPEC_", "D2PERSIST_")


def _forkable(extra):
    return all(key.startswith(_FORKABLE_ENV) for key in extra or {})


def start_tool(script, *args, env=None, cwd=REPO):
    """
    Start ``python SCRIPT ARGS`` forked from the fork server, in a session of its own, and
    return at once: a :class:`forkserver.ForkedProcess` (``pid``, ``poll``, ``send_signal``,
    ``wait``, ``communicate``; output captured). The caller kills what is left
    (:func:`kill_tree`).
    """
    assert _forkable(env), f"not forkable with {sorted(env)}: use subprocess.Popen"
    return fork_server().popen([script, *args], tool_env(**(env or {})), cwd)


def run_tool(script, *args, timeout=300, env=None, cwd=REPO, launcher=(), fresh=False):
    """
    Run a tool in a process of its own; returns the CompletedProcess (text output captured).
    The tool runs in its own process group: on a timeout the group (with the workers
    ``launch()`` or torchrun started) is killed and the test fails, so a hang never outlives
    its test. A plain ``python tools/X.py`` or ``python -m MODULE`` run is forked from the
    session's fork server (:mod:`forkserver`: the same process boundary without paying torch's
    import again); with a ``launcher`` or ``fresh``, a new interpreter starts.

    Args:
        launcher: arguments of ``python`` before the script, e.g. :func:`torchrun` 's.
        fresh: start a new interpreter (a test about what the tool imports at start-up).
    """
    import subprocess

    full_env = tool_env(**(env or {}))
    if (not (fresh or launcher) and _forkable(env)
            and (script == "-m" or str(script).endswith(".py") and os.path.isfile(script))):
        return fork_server().run([script, *args], full_env, cwd, timeout, kill_tree)
    cmd = [sys.executable, *map(str, launcher), script, *[str(a) for a in args]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(
            f"{os.path.basename(script)} did not finish in {timeout} s (a hang?):\n{err[-3000:]}"
        ) from None
    finally:
        kill_tree(proc.pid)  # workers left behind by a failed run
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _descendants(pid):
    """Every living descendant of ``pid`` (Linux /proc), children first."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                kids = [int(p) for p in f.read().split()]
        except OSError:
            continue
        found += kids
        todo += kids
    return found


def kill_tree(pid):
    """
    SIGKILL the process group of ``pid`` and every descendant: torchrun starts each worker in
    a session of its own, which killing torchrun's group does not reach.
    """
    import signal

    for p in _descendants(pid) if sys.platform.startswith("linux") else ():
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


#: Evaluate on the quick val split (the val split's first 10 images) every 2 iterations (and at
#: the end); the export's own evaluation is off (tests/test_default_schedule.py and
#: test_distributed.py test it).
EVAL_OPTS = ["DATASETS.TEST", "('shapes_val_10',)", "TEST.EVAL_PERIOD", 2,
             "PERSIST.EXPORT_EVAL", False]


def eval_trainer():
    """PersistTrainer evaluating with COCOEvaluator, as tools/train_net.py's Trainer does."""
    from detectron2.evaluation import COCOEvaluator

    from d2persist import PersistTrainer

    class EvalTrainer(PersistTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            # COCOEvaluator caches the dataset's COCO json in its output folder and remembers
            # it in MetadataCatalog for the process: one folder for the test session
            return COCOEvaluator(dataset_name,
                                 output_dir=os.path.join(os.environ["D2PERSIST_CACHE"], "coco"))

    return EvalTrainer


def metric_recorder(metric):
    """A hook recording ``{iteration: value}`` of each evaluation's ``metric`` (in ``.values``)."""
    from detectron2.engine import HookBase

    class Recorder(HookBase):
        def __init__(self):
            self.values = {}

        def _look(self, at, it):
            entry = self.trainer.storage.latest().get(metric)
            if entry is not None and entry[1] == at:
                self.values[it] = entry[0]

        def after_step(self):
            self._look(self.trainer.iter, self.trainer.iter)

        def after_train(self):  # the final evaluation, of the last iteration's weights
            self._look(self.trainer.storage.iter, self.trainer.max_iter - 1)

    return Recorder()


#: The environment of a run of several processes on this machine: one thread each, as torchrun
#: gives its workers unless told otherwise. Two processes with two threads each on two cores took
#: about twice as long (a 30-iteration ``--num-gpus 2`` run: 25-30 s against 14-15 s here).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


#: seconds a process of a multi-process run may wait for another before the run fails: a hang
#: fails its test in about a minute
DIST_TIMEOUT = ["--dist-timeout", 60]
#: two processes under detectron2's launch() on this machine
LAUNCH2 = ["--num-gpus", 2, "--dist-url", "auto", *DIST_TIMEOUT]
#: the multi-process reference run's options (conftest's ``launch2_run``)
LAUNCH2_OPTS = [*TINY_OPTS, "SOLVER.MAX_ITER", 16, "SOLVER.CHECKPOINT_PERIOD", 2,
                "PERSIST.EXPORT", False, "PERSIST.EMA_DECAY", 0.9, "PERSIST.EMA_WARMUP", 4]


def torchrun(*args):
    """``launcher`` for :func:`run_tool`: torch's own elastic launcher, ``torchrun ARGS``."""
    return ("-m", "torch.distributed.run", *args)


def free_port():
    """
    A free TCP port on 127.0.0.1 for a server a test starts, which binds it seconds later:
    between Ray's worker ports (10002-19999) and the kernel's ephemeral range, so that no
    process binding port 0 meanwhile (Ray's own, any client's connection) is given it. The
    kernel's own choice (port 0) was, once: Serve could not listen on it.
    """
    import random
    import socket

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randint(20000, max(20001, low - 1))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("No free TCP port between 20000 and the ephemeral range.")


def tool_env(**extra):
    """
    The environment :func:`run_tool` gives a tool, for tests that start it with Popen: the
    tools import this checkout's d2persist, whatever copy pip installed.
    """
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=path, **extra)


#: Run a tool with torch, torchvision and detectron2 made unimportable.
WITHOUT_TORCH = (
    "import runpy, sys\n"
    "for name in ('torch', 'torchvision', 'detectron2'):\n"
    "    sys.modules[name] = None  # any import of them raises ImportError\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "leaked = [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', "
    "'detectron2') and sys.modules[m] is not None]\n"
    "assert not leaked, leaked\n"
)


# -- every model family: detectron2's model-zoo configs made tiny ------------------------------

#: Shapes data with a 10-image val split: the families' evaluations stay short.
PREFIX = "shapes10"

#: Overrides that make a model-zoo config tiny and trainable from scratch on a CPU: ResNet-18
#: with BatchNorm (FrozenBN and frozen stages only suit pretrained weights), clipped gradients.
TINY = [
    "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.RESNETS.NORM", "BN",
    "MODEL.BACKBONE.FREEZE_AT", 0, "MODEL.FPN.OUT_CHANNELS", 32,
    "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 96, "INPUT.MIN_SIZE_TEST", 64,
    "INPUT.MAX_SIZE_TEST", 96, "SOLVER.IMS_PER_BATCH", 2, "SOLVER.BASE_LR", 0.01,
    "SOLVER.WARMUP_ITERS", 2, "SOLVER.STEPS", (), "SOLVER.MAX_ITER", 4,
    "SOLVER.CHECKPOINT_PERIOD", 2, "SOLVER.CLIP_GRADIENTS.ENABLED", True,
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 5.0,
    "DATALOADER.NUM_WORKERS", 0, "TEST.EVAL_PERIOD", 0, "DATASETS.TEST", (), "SEED", 7,
    "PERSIST.BEST_METRIC", "", "PERSIST.EXPORT_FORMATS", ["safetensors", "onnx"],
    "PERSIST.EXPORT_EVAL", False,
]
_RCNN = ["MODEL.ROI_HEADS.NUM_CLASSES", 3, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
         "MODEL.ROI_BOX_HEAD.FC_DIM", 64, "MODEL.ROI_MASK_HEAD.CONV_DIM", 32,
         "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64,
         "MODEL.RPN.POST_NMS_TOPK_TEST", 64]
#: Evaluated at the end, and the export evaluates itself (the families with a metric of their
#: own: keypoint AP, mIoU, PQ).
_EVAL = ["TEST.EVAL_PERIOD", 0, "PERSIST.EXPORT_EVAL", True]

#: family -> (zoo config, overrides, task of the ONNX graph, dataset task suffix, evaluated)
FAMILIES = {
    "keypoint": ("COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml", _RCNN + [
        "MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", len(SHAPE_KEYPOINTS),
        "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", (32, 32),
        "TEST.KEYPOINT_OKS_SIGMAS", KEYPOINT_OKS_SIGMAS], "rcnn", "_kp", True),
    "semantic": ("Misc/semantic_R_50_FPN_1x.yaml", [
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 4, "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32],
        "semantic", "_sem", True),
    "panoptic": ("COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml", _RCNN + [
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 2, "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32,
        "MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH", 0.05,
        "MODEL.PANOPTIC_FPN.COMBINE.STUFF_AREA_LIMIT", 16], "panoptic", "_panoptic", True),
    "retinanet": ("COCO-Detection/retinanet_R_50_FPN_1x.yaml", [
        "MODEL.RETINANET.NUM_CLASSES", 3, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0,
        "TEST.DETECTIONS_PER_IMAGE", 20], "dense", "", False),
    "rpn": ("COCO-Detection/rpn_R_50_FPN_1x.yaml", ["MODEL.RPN.POST_NMS_TOPK_TEST", 20],
            "rpn", "", False),
    "cascade": ("Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml", _RCNN, "rcnn", "", False),
    # (res5 runs on every proposal: 16 of them, not 64)
    "c4": ("COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml",
           _RCNN + ["SOLVER.MAX_ITER", 2, "MODEL.RPN.POST_NMS_TOPK_TEST", 16], "rcnn", "", False),
}


def family_trainer():
    """tools/train_net.py's Trainer: the family's evaluator, chosen by the tool."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "d2persist_train_net", os.path.join(REPO, "tools", "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Trainer


def family_cfg(name, out):
    """Family ``name``'s zoo config made tiny, on its shapes task data, writing into ``out``."""
    from detectron2 import model_zoo  # imports pkg_resources: setup.py keeps setuptools < 81

    path, opts, _, suffix, evaluated = FAMILIES[name]
    register_shapes(PREFIX, num_val=10)
    cfg = get_cfg()
    add_persist_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file(path))
    cfg.merge_from_list(TINY + opts + ["DATASETS.TRAIN", (f"{PREFIX}{suffix}_train",),
                                       "OUTPUT_DIR", str(out)])
    if evaluated:
        cfg.merge_from_list(_EVAL + ["DATASETS.TEST", (f"{PREFIX}{suffix}_val",)])
    return cfg


def direct_validation_loss(cfg, weights):
    """
    PERSIST.VAL_LOSS's definition, computed here on ``weights``: the mean over the first test
    dataset's images, each mapped by the training mapper with the test resize, of the model's
    loss terms in training mode (BatchNorm on its running statistics), the sampling seeded by
    the image's index; ``{"validation/<term>": mean}`` and ``validation/total_loss``.
    """
    import copy

    import torch
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.data import transforms as T
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    model = build_model(cfg)
    model.load_state_dict(weights)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    mapper = DatasetMapper(cfg, is_train=True, augmentations=[resize])
    sums, dicts = {}, DatasetCatalog.get(cfg.DATASETS.TEST[0])
    with torch.no_grad(), EventStorage():
        for i, d in enumerate(dicts):
            torch.manual_seed(i)
            losses = {k: float(v) for k, v in model([mapper(copy.deepcopy(d))]).items()}
            losses["total_loss"] = sum(losses.values())
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
    return {"validation/" + k: v / len(dicts) for k, v in sums.items()}
