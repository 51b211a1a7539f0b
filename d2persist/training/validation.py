"""
The validation loss (``PERSIST.VAL_LOSS``): the model's own loss terms on the test set.
"""

import logging
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Sequence, Tuple

import torch
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

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
        import copy

        return index, self.mapper(copy.deepcopy(self.dicts[index]))


def _first(batch):
    return batch[0]


def validation_batches(run: "RunConfig") -> Iterable[Tuple[int, dict]]:
    """
    This process's share of the run's first test dataset, each image once over all processes
    (detectron2's ``InferenceSampler``): ``(index in the dataset, the mapped image)``.
    """
    from detectron2.data import DatasetCatalog, DatasetFromList, MapDataset
    from detectron2.data.samplers import InferenceSampler

    name = run.test_dataset_name()
    assert name is not None, "checked with the config"
    dicts = DatasetCatalog.get(name)
    dataset = MapDataset(DatasetFromList(list(range(len(dicts))), copy=False),
                         _Indexed(dicts, run.build_validation_mapper()))
    return torch.utils.data.DataLoader(dataset, batch_size=1, sampler=InferenceSampler(len(dicts)),
                                       num_workers=run.validation_workers(), collate_fn=_first)


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
    (collective), each image on its own.

    The model runs in training mode (its loss terms are computed only then) under
    ``torch.no_grad``, with its BatchNorm layers in evaluation mode (their running statistics,
    which nothing changes, as at evaluation); each image's random sampling (anchors, proposals) is
    seeded by its index in the dataset. So the result depends only on the weights and the images,
    not on the number of processes, and training's RNG state, buffers and event storage are as
    they were before.

    Returns:
        dict: ``validation/<term>`` and ``validation/total_loss`` (their sum), on every process.
    """
    module = unwrap_model(model)
    modes = {m: m.training for m in module.modules()}
    rng = get_rng_state()
    mine: List[Tuple[int, Dict[str, float]]] = []
    try:
        module.train()
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase):
                m.eval()
        with EventStorage():  # what the model logs while computing losses stays out of training's
            for index, inputs in batches:
                mine.append((int(index), _losses_of(module, int(index), inputs)))
    finally:
        for m, training in modes.items():
            m.training = training
        set_rng_state(rng)
    parts = comm.all_gather(mine) if comm.get_world_size() > 1 else [mine]
    per_image = sorted((x for part in parts for x in part), key=lambda x: x[0])
    if not per_image:
        return {}
    keys = list(per_image[0][1])
    n = len(per_image)
    return {VALIDATION_PREFIX + k: sum(losses[k] for _, losses in per_image) / n for k in keys}
