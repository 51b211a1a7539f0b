"""
The validation loss (``PERSIST.VAL_LOSS``): the model's own loss terms on the test set.
"""

import copy
import logging
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Sequence, Tuple

import torch
from detectron2.utils.events import EventStorage

from ..collective import all_compute
from ..errors import ConfigError
from .ema import unwrap_model
from .state import get_rng_state, set_rng_state

if TYPE_CHECKING:
    from ..runconfig import RunConfig

__all__ = ["VALIDATION_PREFIX", "validation_loss", "validation_batches"]

logger = logging.getLogger(__name__)

#: the event-storage names of the loss terms: ``validation/total_loss``, ``validation/loss_cls``
VALIDATION_PREFIX = "validation/"


class _Indexed:
    """Dataset item ``i``: ``(i, mapper(dicts[i]))`` (a class: data-loader workers pickle it)."""

    def __init__(self, dicts: Sequence[dict], mapper: Callable[[dict], Any]) -> None:
        self.dicts = dicts
        self.mapper = mapper

    def __call__(self, index: int) -> Tuple[int, Any]:
        return index, self.mapper(copy.deepcopy(self.dicts[index]))


def _first(batch):
    return batch[0]


def validation_batches(run: "RunConfig") -> Iterable[Tuple[int, dict]]:
    """
    This process's share of the run's first test dataset, each image once over all processes
    (detectron2's ``InferenceSampler``): ``(index in the dataset, the mapped image)``.

    Raises:
        ConfigError: the dataset has no annotations to compute a loss from.
    """
    from detectron2.data import DatasetCatalog, DatasetFromList, MapDataset
    from detectron2.data.samplers import InferenceSampler

    name = run.test_dataset_name()
    assert name is not None, "checked with the config"
    dicts = DatasetCatalog.get(name)
    if not any("annotations" in d or "sem_seg_file_name" in d for d in dicts):
        raise ConfigError(f"PERSIST.VAL_LOSS needs annotations, and the test dataset {name!r} "
                          "has none (no 'annotations' nor 'sem_seg_file_name' in its dicts).")
    dataset = MapDataset(DatasetFromList(list(range(len(dicts))), copy=False),
                         _Indexed(dicts, run.build_validation_mapper()))
    return torch.utils.data.DataLoader(dataset, batch_size=1, sampler=InferenceSampler(len(dicts)),
                                       num_workers=run.validation_workers(), collate_fn=_first)


def _numbers(module: torch.nn.Module) -> List[Tuple[torch.nn.Module, Dict[str, Any]]]:
    """
    The plain numbers each submodule keeps as attributes (not parameters nor buffers), which a
    forward in training mode may change: RetinaNet's and FCOS's ``loss_normalizer``.
    """
    out = []
    for m in module.modules():
        numbers = {k: v for k, v in vars(m).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:
            out.append((m, numbers))
    return out


def _set(module, numbers):
    """Give every submodule back its numbers, and drop those a forward added."""
    saved = dict(numbers)
    for m in module.modules():
        values = saved.get(m, {})
        for k in [k for k, v in vars(m).items() if k not in values and isinstance(v, (int, float))
                  and not isinstance(v, bool)]:
            delattr(m, k)
        for k, v in values.items():
            setattr(m, k, v)


def _losses_of(module: torch.nn.Module, index: int, inputs: dict) -> Dict[str, float]:
    torch.manual_seed(index)  # the sampling of anchors and proposals, per image
    losses = module([inputs])
    out = {k: float(v) for k, v in losses.items()}
    out["total_loss"] = sum(out.values())
    return out


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: Iterable[Tuple[int, dict]]
                    ) -> Dict[str, float]:
    """
    The mean of the model's loss terms over the images of ``batches`` on all processes
    (collective; a failure on any process raises on all), each image on its own.

    The model runs in training mode (its loss terms are computed only then) under
    ``torch.no_grad``, with its BatchNorm layers in evaluation mode (their running statistics,
    which nothing changes, as at evaluation) and without training's visualizations
    (``vis_period`` 0); each image starts from the model's state as training left it (the plain
    numbers a forward in training mode updates, e.g. RetinaNet's ``loss_normalizer``, are set
    back), and its random sampling (anchors, proposals) is seeded by its index in the dataset.
    So the result depends only on the weights and the images, not on the number of processes or
    their order, and training's RNG states, buffers, numbers and event storage are as they were.

    Returns:
        dict: ``validation/<term>`` (each the mean over the images that have it) and
        ``validation/total_loss`` (the mean of their sum), on every process.
    """
    module = unwrap_model(model)

    def mine() -> List[Tuple[int, Dict[str, float]]]:
        modes = {m: m.training for m in module.modules()}
        numbers = _numbers(module)
        rng = get_rng_state()
        out = []
        try:
            module.train()
            for m in module.modules():
                if isinstance(m, torch.nn.modules.batchnorm._NormBase):
                    m.eval()
            with EventStorage():  # what the model logs stays out of training's storage
                for index, inputs in batches:
                    _set(module, numbers)
                    for m in module.modules():  # no training visualizations
                        if "vis_period" in vars(m):
                            m.vis_period = 0
                    out.append((int(index), _losses_of(module, int(index), inputs)))
        finally:
            _set(module, numbers)
            for m, training in modes.items():
                m.training = training
            set_rng_state(rng)
        return out

    parts = all_compute(mine, "the validation loss (PERSIST.VAL_LOSS)")
    per_image = sorted((x for part in parts for x in part), key=lambda x: x[0])
    sums: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    for _, losses in per_image:  # in the dataset's order: the same sums on any world size
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1
    return {VALIDATION_PREFIX + k: sums[k] / counts[k] for k in sums}
