#!/usr/bin/env python
"""
A user's training script whose evaluator reports a scripted metric: ``bbox/AP`` is 10 for the
weights of iterations 0 and 1 and 20 after that, so with ``TEST.EVAL_PERIOD 2`` the metric
improves once (after iteration 3) and then never again: early stopping with patience P stops
after iteration 3 + 2 P. A stock ``DefaultTrainer`` subclass with ``PersistHook`` registered,
under detectron2's ``launch()`` (the evaluation itself runs the model on every test image).

    python tests/scripts/scripted_metric_trainer.py --num-gpus 2 [--resume] [KEY VALUE ...]
"""

import os
import sys

from detectron2.engine import DefaultTrainer, default_argument_parser
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils.events import get_event_storage

from d2persist.cli import add_launch_arguments, launch_main
from d2persist.training.trainer import create_ddp_model
from tests.scripts import stock_trainer  # the user's script this one varies

SCRIPT_PATH = os.path.abspath(__file__)
d2_defaults.create_ddp_model = create_ddp_model  # a CPU model takes no device_ids


def scripted_ap(iteration):
    """The scripted ``bbox/AP`` of the weights after ``iteration``."""
    return 10.0 if iteration < 2 else 20.0


class ScriptedEvaluator(DatasetEvaluator):
    """Reports :func:`scripted_ap` of the event storage's iteration (EvalHook's evaluation)."""

    def process(self, inputs, outputs):
        pass

    def evaluate(self):
        # in after_step the storage's iteration is the weights'; in after_train it is MAX_ITER
        storage = get_event_storage()
        return {"bbox": {"AP": scripted_ap(storage.iter)}}


class Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return ScriptedEvaluator()


def main(args):
    # an early stop ends train() with EarlyStopped: exit status 0
    stock_trainer.train(args, Trainer)


if __name__ == "__main__":
    sys.exit(launch_main(main, add_launch_arguments(default_argument_parser()).parse_args()))
