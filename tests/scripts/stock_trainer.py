#!/usr/bin/env python
"""
A user's own training script, as the README's one-liner has it: a stock ``DefaultTrainer``
subclass (only ``build_evaluator`` defined) with ``PersistHook`` registered, under detectron2's
``launch()``. The only CPU-specific change: DDP without ``device_ids``.

    python tests/scripts/stock_trainer.py --num-gpus 2 [--resume] [KEY VALUE ...]
"""

import os
import sys

from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import COCOEvaluator
from detectron2.utils.env import seed_all_rng

from d2persist import PersistHook, add_persist_config
from d2persist.cli import add_launch_arguments, launch_main
from d2persist.data.shapes import register_shapes
from d2persist.training.trainer import create_ddp_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
d2_defaults.create_ddp_model = create_ddp_model  # a CPU model takes no device_ids


class Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return COCOEvaluator(dataset_name, output_dir=os.path.join(cfg.OUTPUT_DIR, "inference"))


def train(args, trainer_cls):
    """The built-in config with the command line's overrides, trained by ``trainer_cls``."""
    register_shapes()
    cfg = add_persist_config(get_cfg())  # the built-in config sets PERSIST options
    cfg.merge_from_file(os.path.join(REPO, "configs", "shapes_mask_rcnn_R_18_FPN.yaml"))
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    seed_all_rng(cfg.SEED)
    trainer = trainer_cls(cfg)
    trainer.register_hooks([PersistHook(cfg)])
    trainer.resume_or_load(resume=args.resume)
    trainer.train()


def main(args):
    train(args, Trainer)


if __name__ == "__main__":
    sys.exit(launch_main(main, add_launch_arguments(default_argument_parser()).parse_args()))
