"""
What exact resume needs besides weights and optimizer: RNG states and the data position.

:class:`ResumableTrainLoader` makes every training batch a pure function of
``(seed, position in the sample stream)``: the sampler order comes from a per-epoch seeded
permutation, and each sample is mapped (augmented) under RNGs seeded by its position. Its
state is a few integers, so a resumed run skips straight to where it stopped (no image is
loaded and discarded) and sees exactly the batches the uninterrupted run saw, with any
number of data workers; and each iteration's global batch is the same with any number of
processes that divides it, so a run resumed with another number continues the same stream.
"""

import contextlib
import copy
import itertools
import logging
import os
import random
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, cast

import numpy as np
import torch
import torch.utils.data as torchdata

from ..collective import main_says
from ..errors import ConfigError

if TYPE_CHECKING:
    from detectron2.config import CfgNode

__all__ = [
    "get_rng_state",
    "set_rng_state",
    "ResumableTrainLoader",
    "build_resumable_train_loader",
    "data_state_to_resume",
    "STREAM_VERSION",
]

#: Version of the loader state: 2 counts positions in the one global sample stream (1, before,
#: counted each process's own share, so its meaning depended on the number of processes).
STREAM_VERSION = 2

logger = logging.getLogger(__name__)


def get_rng_state() -> dict:
    """
    The Python, NumPy and torch RNG states of this process, as plain data and tensors only
    (loadable with ``torch.load(weights_only=True)``).
    """
    # the global RandomState's MT19937 gives the legacy tuple, never the dict
    kind, keys, pos, has_gauss, cached = cast(Tuple[str, np.ndarray, int, int, float],
                                              np.random.get_state())
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore states from :func:`get_rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _rng_seeded(*seed):
    """Run a block under Python/NumPy/torch RNGs seeded by ``seed``, then restore the caller's."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    s = int(np.random.SeedSequence([int(x) for x in seed]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class _SampleOrder:
    """Index of the ``g``-th sample of an infinite stream of seeded per-epoch permutations."""

    def __init__(self, size, seed, shuffle):
        self._size, self._seed, self._shuffle = size, seed, shuffle
        self._epoch, self._perm = None, None

    def __call__(self, g):
        epoch, offset = divmod(g, self._size)
        if not self._shuffle:
            return offset
        if epoch != self._epoch:
            gen = torch.Generator()
            gen.manual_seed(int(np.random.SeedSequence([self._seed, epoch]).generate_state(1)[0]))
            self._epoch, self._perm = epoch, torch.randperm(self._size, generator=gen).tolist()
        return self._perm[offset]


class _BatchPlans:
    """
    Infinite iterable of ``(samples, state_after)``: ``samples`` is this process's share (a list
    of (stream position, dataset index)) of one global batch, ``state_after`` the loader state
    once it is consumed.

    The global batches do not depend on the number of processes: every process walks the same
    global sample stream, groups it by aspect ratio into batches of ``batch_size x world_size``
    samples, and takes its slice ``rank`` of each. So the images of an iteration, and the state
    after it, are the same with 1, 2 or 4 processes (for world sizes that divide the batch),
    and a run resumed with another number of processes continues the same stream.
    """

    def __init__(self, order, aspect_of, batch_size, rank, world_size, state):
        self._order, self._aspect_of = order, aspect_of
        self._batch_size, self._rank, self._world = batch_size, rank, world_size
        self._state = state

    def __iter__(self):
        p = self._state["position"]
        buckets = [list(b) for b in self._state["buckets"]]
        total = self._batch_size * self._world
        mine = slice(self._rank * self._batch_size, (self._rank + 1) * self._batch_size)
        while True:
            bucket = buckets[self._aspect_of(self._order(p))]
            bucket.append(p)
            p += 1
            if len(bucket) == total:
                batch = [(x, self._order(x)) for x in bucket[mine]]
                bucket.clear()
                yield batch, {"position": p, "buckets": [list(b) for b in buckets]}


class _MappedBatches(torchdata.Dataset):
    """Maps a batch plan to the list of mapped samples, each under RNGs seeded by position."""

    def __init__(self, dataset, mapper, seed):
        self._dataset, self._mapper, self._seed = dataset, mapper, seed

    def __getitem__(self, plan):
        samples, state_after = plan
        out = []
        for g, idx in samples:
            for attempt in itertools.count():
                with _rng_seeded(self._seed, g, attempt):
                    if attempt:  # the mapper rejected the sample: take a seeded substitute
                        idx = random.randrange(len(self._dataset))
                    mapped = self._mapper(copy.deepcopy(self._dataset[idx]))
                if mapped is not None:
                    break
                if attempt >= 10:
                    raise RuntimeError(f"The mapper rejected 10 samples in a row at position {g}.")
            out.append(mapped)
        return state_after, out

    def __len__(self):  # never used for sampling: the plan iterable is infinite
        return len(self._dataset)


def _identity(x):
    return x


class ResumableTrainLoader:
    """
    An infinite training data loader whose position is part of the checkpoint.

    Iterating yields lists of mapped dataset dicts (``batch_size`` per process), like
    :func:`detectron2.data.build_detection_train_loader`. :meth:`state_dict` is the state after
    the last batch handed out; :meth:`load_state_dict` before iteration starts resumes there.
    """

    def __init__(
        self,
        dataset: Union[List[dict], torchdata.Dataset],
        mapper: Callable[[dict], Any],
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        aspect_ratio_grouping: bool = True,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """
        Args:
            dataset (list[dict] or Dataset): detectron2 dataset dicts (indexable).
            mapper (callable): dataset dict -> model input dict, e.g. ``DatasetMapper``.
            batch_size (int): images per batch in this process.
            seed (int): seed of the sample order and of each sample's augmentation.
            shuffle (bool): shuffle the sample order each epoch.
            aspect_ratio_grouping (bool): batch landscape and portrait images separately,
                decided from each dict's ``width``/``height``.
            num_workers (int): torch DataLoader workers.
            rank, world_size (int): this process takes slice ``rank`` of each global batch of
                ``batch_size * world_size`` samples (see :class:`_BatchPlans`).
        """
        self._dataset = dataset
        self._mapper = mapper
        self._batch_size = batch_size
        self._shuffle = shuffle
        # the bucket of each dataset index, read once (a serialized dataset unpickles per read)
        self._aspects: Optional[List[int]] = None
        if aspect_ratio_grouping:
            dicts = (dataset[i] for i in range(len(dataset)))
            self._aspects = [int(d["width"] > d["height"]) for d in dicts]
        self._num_workers = num_workers
        self._rank, self._world = rank, world_size
        self._state: Dict[str, Any] = {"seed": int(seed), "position": 0, "buckets": [[], []],
                                       "version": STREAM_VERSION}

    def _aspect_of(self, idx):
        return self._aspects[idx] if self._aspects is not None else 0

    def state_dict(self) -> Dict[str, Any]:
        """The loader state after the last batch handed out (plain ints and lists)."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; call before iterating."""
        self._state = copy.deepcopy(state)

    def __iter__(self):
        seed = self._state["seed"]
        order = _SampleOrder(len(self._dataset), seed, self._shuffle)
        plans = _BatchPlans(
            order, self._aspect_of, self._batch_size, self._rank, self._world, self._state
        )
        loader = torchdata.DataLoader(
            _MappedBatches(self._dataset, self._mapper, seed),
            sampler=plans,
            batch_size=None,
            collate_fn=_identity,
            num_workers=self._num_workers,
            prefetch_factor=2 if self._num_workers > 0 else None,
            # a private generator: creating the worker iterator must not draw from (and so
            # change) the global torch RNG that the model's sampling uses
            generator=torch.Generator().manual_seed(seed),
        )
        for state_after, batch in loader:
            self._state = dict(state_after, seed=seed, version=STREAM_VERSION)
            yield batch


def data_state_to_resume(states: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """
    The data loader state to resume from, given every saving process's ``{"rng", "data"}``.

    Since :data:`STREAM_VERSION` 2 every process saves the same global stream position, valid
    for any number of processes. A state of an earlier d2persist counted per-process positions:
    from one process it means the same; from several it is converted approximately (the
    samples drawn but not yet batched are skipped), with a warning.

    Returns:
        dict or None: for ``ResumableTrainLoader.load_state_dict``, or None if none was saved.
    """
    data = states[0].get("data") if states else None
    if data is None or data.get("version", 1) >= STREAM_VERSION or len(states) == 1:
        return data
    logger.warning(
        "The checkpoint's data position was saved by an earlier d2persist with %d processes: "
        "continuing approximately (a few samples are skipped, none is seen twice).", len(states),
    )
    # process r had drawn the stream positions p * W + r for p below its position: continue
    # after the furthest of them
    drawn = len(states) * max(s["data"]["position"] for s in states)
    return {"seed": data["seed"], "position": drawn, "buckets": [[], []],
            "version": STREAM_VERSION}


def build_resumable_train_loader(cfg: "CfgNode", mapper: Optional[Callable[[dict], Any]] = None
                                 ) -> "ResumableTrainLoader":
    """
    A :class:`ResumableTrainLoader` for a detectron2 config, in place of
    :func:`detectron2.data.build_detection_train_loader` (same datasets, filtering and mapper).

    Args:
        cfg (CfgNode): DATASETS.TRAIN, DATALOADER.*, SOLVER.IMS_PER_BATCH, SEED are used.
        mapper (callable): defaults to ``DatasetMapper(cfg, is_train=True)``.

    Raises:
        ConfigError: a ``DATALOADER.SAMPLER_TRAIN`` other than ``TrainingSampler``.
    """
    from detectron2.data import DatasetFromList, DatasetMapper, get_detection_dataset_dicts
    from detectron2.utils import comm

    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise ConfigError(
            f"DATALOADER.SAMPLER_TRAIN={cfg.DATALOADER.SAMPLER_TRAIN} is not supported by "
            "PersistTrainer's resumable loader, which samples like TrainingSampler: set "
            "DATALOADER.SAMPLER_TRAIN=TrainingSampler, or override build_train_loader to return "
            "detectron2's build_detection_train_loader(cfg) (a resumed run then gets its RNG "
            "states back, not its data position)."
        )
    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=(
            cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
        ),
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    world = comm.get_world_size()
    total = cfg.SOLVER.IMS_PER_BATCH
    if total % world:
        raise ValueError(f"SOLVER.IMS_PER_BATCH={total} is not divisible by {world} processes.")
    seed = cfg.SEED if cfg.SEED >= 0 else int.from_bytes(os.urandom(4), "little") >> 1
    seed = main_says(seed)
    return ResumableTrainLoader(
        DatasetFromList(dicts, copy=False),
        mapper or DatasetMapper(cfg, True),
        total // world,
        seed=seed,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        rank=comm.get_rank(),
        world_size=world,
    )
