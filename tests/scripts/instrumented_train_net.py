#!/usr/bin/env python
"""
tools/train_net.py, instrumented for tests (what it computes is unchanged):

- it records which dataset images each process trains on in each iteration: one JSON line
  ``{"iter": i, "ids": [image_id, ...]}`` per batch in ``OUTPUT_DIR/batches.rank{R}.jsonl``;
- with ``STOP_AT=N`` in the environment the last process sends itself SIGUSR1 as iteration N
  begins (PERSIST.STOP_SIGNALS must hold it);
- with ``HOLD_AT=N`` and ``HOLD_UNTIL=PATH`` it waits, as iteration N begins, until PATH exists
  (at most 300 s).

    python tests/scripts/instrumented_train_net.py --num-gpus 2 [--resume] [KEY VALUE ...]
"""

import json
import os
import signal
import sys
import time
import weakref

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "tools")
sys.path.insert(0, TOOLS)

import train_net  # noqa: E402  (tools/train_net.py)
from detectron2.engine import HookBase  # noqa: E402
from detectron2.utils import comm  # noqa: E402

from d2persist.cli import add_launch_arguments, launch_main  # noqa: E402


class _Recording:
    """The training loader, writing each batch's image ids with the trainer's iteration."""

    def __init__(self, loader):
        self._loader, self.trainer, self.path = loader, None, None

    def __iter__(self):
        for batch in self._loader:
            with open(self.path, "a") as f:
                f.write(json.dumps({"iter": self.trainer.iter,
                                    "ids": [d["image_id"] for d in batch]}) + "\n")
            yield batch

    def state_dict(self):
        return self._loader.state_dict()

    def load_state_dict(self, state):
        self._loader.load_state_dict(state)


class _StopAt(HookBase):
    def __init__(self, it):
        self.it = it

    def before_step(self):
        if self.trainer.iter == self.it and comm.get_rank() == comm.get_world_size() - 1:
            os.kill(os.getpid(), signal.SIGUSR1)


class _HoldAt(HookBase):
    def __init__(self, it, path):
        self.it, self.path = it, path

    def before_step(self):
        deadline = time.monotonic() + 300
        while self.trainer.iter == self.it and not os.path.exists(self.path):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.path} did not appear")
            time.sleep(0.05)


class RecordingTrainer(train_net.Trainer):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.data_loader.trainer = weakref.proxy(self)
        self.data_loader.path = os.path.join(cfg.OUTPUT_DIR, f"batches.rank{comm.get_rank()}.jsonl")
        if os.environ.get("STOP_AT"):
            self.register_hooks([_StopAt(int(os.environ["STOP_AT"]))])
        if os.environ.get("HOLD_AT"):
            self.register_hooks([_HoldAt(int(os.environ["HOLD_AT"]), os.environ["HOLD_UNTIL"])])

    @classmethod
    def build_train_loader(cls, cfg):
        return _Recording(super().build_train_loader(cfg))


train_net.Trainer = RecordingTrainer

if __name__ == "__main__":
    launch_main(train_net.main, add_launch_arguments(
        train_net.default_argument_parser()).parse_args())
