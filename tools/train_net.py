#!/usr/bin/env python
"""
Train a detectron2 model with d2persist persisting the run.

Like detectron2's tools/train_net.py, with PersistHook in place of the default checkpointer:
the output folder gets config.yaml, verified checkpoints, model_final.pth and an inference
export. With no --config-file, trains the built-in Mask R-CNN on the synthetic shapes data.

    python tools/train_net.py                       # built-in shapes model, CPU
    python tools/train_net.py --resume              # continue from the newest checkpoint
    python tools/train_net.py --num-gpus 2          # two processes (gloo on a CPU machine)
    python tools/train_net.py --config-file my.yaml OUTPUT_DIR out/ SOLVER.MAX_ITER 1000
"""

import os

# first: without detectron2, d2persist's import of its trainer says how to install it
from d2persist import PersistTrainer  # isort: skip
import torch
import yaml
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from d2persist import ConfigError, PersistCheckpointer, add_persist_config
from d2persist.cli import (
    add_launch_arguments,
    check_weights,
    exit_on_known_errors,
    launch_main,
    setup_run,
)
from d2persist.data.shapes import register_shapes
from d2persist.export.self_eval import family_evaluator

DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "configs", "shapes_mask_rcnn_R_18_FPN.yaml"
)
PROG = "train_net.py"


class Trainer(PersistTrainer):
    """
    PersistTrainer evaluating with the dataset's evaluator (by its ``evaluator_type``, as
    detectron2's tool chooses: COCO boxes, masks and keypoints, semantic mIoU, panoptic PQ), and
    on a CPU with torch's fused SGD kernel.
    """

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return family_evaluator(dataset_name, output_folder, cfg.TEST.KEYPOINT_OKS_SIGMAS)

    @classmethod
    def build_optimizer(cls, cfg, model):
        """
        detectron2's optimizer (SGD with its parameter groups and gradient clipping), on a CPU
        with torch's fused kernel: one pass over the weights instead of several.
        """
        if cfg.MODEL.DEVICE != "cpu":
            return super().build_optimizer(cfg, model)
        solver = cfg.SOLVER
        params = get_default_optimizer_params(
            model, base_lr=solver.BASE_LR, weight_decay_norm=solver.WEIGHT_DECAY_NORM,
            bias_lr_factor=solver.BIAS_LR_FACTOR, weight_decay_bias=solver.WEIGHT_DECAY_BIAS,
        )
        try:
            sgd = torch.optim.SGD(params, lr=solver.BASE_LR, momentum=solver.MOMENTUM,
                                  nesterov=solver.NESTEROV, weight_decay=solver.WEIGHT_DECAY,
                                  fused=True)
        except RuntimeError:  # a torch without a fused SGD for the CPU
            return super().build_optimizer(cfg, model)
        return maybe_add_gradient_clipping(cfg, sgd)


def _check_mapping(path):
    """Refuse a config file that is empty, or a list or a plain text, in one sentence."""
    try:
        with open(path, "rb") as f:
            data = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError):  # merge_from_file says why
        return
    if not isinstance(data, dict):
        raise ConfigError(f"The config {path} holds no mapping of config keys (it is "
                          f"{'empty' if data is None else 'a ' + type(data).__name__}).")


def setup(args):
    """Create the config and set up logging."""
    cfg = get_cfg()
    add_persist_config(cfg)
    path = args.config_file or DEFAULT_CONFIG
    if not os.path.isfile(path):
        raise ConfigError(f"Config file {path} " + (
            "is a folder." if os.path.isdir(path) else "does not exist."))
    if path.endswith(".py"):
        raise ConfigError(f"{path} is a LazyConfig: train it with tools/lazyconfig_train_net.py.")
    _check_mapping(path)
    try:
        cfg.merge_from_file(path)
        cfg.merge_from_list(args.opts)
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"The config does not load: {e}.") from None
    except (yaml.YAMLError, OSError) as e:  # not YAML, or a _BASE_ that is not there
        raise ConfigError(f"The config {path} does not load ({type(e).__name__}: "
                          f"{' '.join(str(e).split())}).") from None
    cfg.freeze()
    check_weights(cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR, args.resume, "MODEL.WEIGHTS",
                  needed=args.eval_only)
    setup_run(cfg, args)
    return cfg


@exit_on_known_errors(PROG)
def main(args):
    cfg = setup(args)
    register_shapes()
    if args.eval_only:
        model = Trainer.build_model(cfg)
        PersistCheckpointer(model, save_dir=cfg.OUTPUT_DIR, evaluated_weights=True
                            ).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    launch_main(main, add_launch_arguments(default_argument_parser()).parse_args())
