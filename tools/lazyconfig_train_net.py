#!/usr/bin/env python
"""
Train a LazyConfig model with d2persist persisting the run, like detectron2's
tools/lazyconfig_train_net.py with PersistHook in place of the periodic checkpointer.

    python tools/lazyconfig_train_net.py                      # built-in shapes LazyConfig
    python tools/lazyconfig_train_net.py --config-file cfg.py train.max_iter=1000 --resume
"""

import os

# first: without detectron2, d2persist's import of its loop says how to install it
from d2persist import train_lazy  # isort: skip
from detectron2.config import LazyConfig
from detectron2.engine import default_argument_parser

from d2persist.cli import (
    add_launch_arguments,
    check_weights,
    exit_on_known_errors,
    launch_main,
    setup_run,
)

DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "configs",
    "shapes_mask_rcnn_R_18_FPN_lazy.py",
)
PROG = "lazyconfig_train_net.py"


@exit_on_known_errors(PROG)
def main(args):
    from d2persist import ConfigError

    if args.eval_only:
        raise ConfigError(f"{PROG} trains; to evaluate a run, use tools/evaluate.py --artifacts "
                          "on its export, or load its weights with d2persist.load_predictor.")
    path = args.config_file or DEFAULT_CONFIG
    if not os.path.isfile(path):
        raise ConfigError(f"Config file {path} " + (
            "is a folder." if os.path.isdir(path) else "does not exist."))
    try:
        cfg = LazyConfig.load(path)
    except Exception as e:  # a .py config runs: any error of it
        raise ConfigError(f"The config does not load ({type(e).__name__}: {e}).") from None
    if "train" not in cfg:
        raise ConfigError(f"{path} has no 'train' section: it is not a LazyConfig of a training "
                          "(a yacs config trains with tools/train_net.py).")
    try:
        cfg = LazyConfig.apply_overrides(cfg, args.opts)
    except Exception as e:  # omegaconf and hydra raise several kinds for a bad override
        raise ConfigError(f"The config does not load ({type(e).__name__}: {e}).") from None
    check_weights(cfg.train.get("init_checkpoint", ""), cfg.train.get("output_dir", ""),
                  args.resume, "train.init_checkpoint")
    setup_run(cfg, args)
    train_lazy(cfg, resume=args.resume)


if __name__ == "__main__":
    launch_main(main, add_launch_arguments(default_argument_parser()).parse_args())
