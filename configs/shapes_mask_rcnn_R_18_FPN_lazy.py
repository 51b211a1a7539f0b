"""
The built-in shapes model as a LazyConfig: a small Mask R-CNN (ResNet-18 FPN) trained from
scratch on CPU. Train it with ``python tools/lazyconfig_train_net.py``.
"""

import os

import detectron2
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from d2persist.data.shapes import register_shapes

register_shapes()  # shapes_train / shapes_val

# detectron2's model-zoo LazyConfigs, read from the installed package (detectron2.model_zoo's
# get_config imports pkg_resources, which current setuptools no longer ships)
_ZOO = os.path.join(os.path.dirname(detectron2.__file__), "model_zoo", "configs", "common")


def get_config(name):
    return LazyConfig.load(os.path.join(_ZOO, name))


model = get_config("models/mask_rcnn_fpn.py").model
dataloader = get_config("data/coco.py").dataloader
optimizer = get_config("optim.py").SGD
train = get_config("train.py").train

bottom_up = model.backbone.bottom_up
bottom_up.stem.norm = "BN"
bottom_up.stages.depth = 18
bottom_up.stages.norm = "BN"
del bottom_up.stages.stride_in_1x1  # basic blocks have no 1x1 conv
bottom_up.freeze_at = 0
model.proposal_generator.anchor_generator.sizes = [[16], [32], [64], [128], [256]]
model.roi_heads.num_classes = 3
model.roi_heads.batch_size_per_image = 64

dataloader.train.dataset.names = "shapes_train"
dataloader.train.mapper.augmentations[0].short_edge_length = (128,)
dataloader.train.mapper.augmentations[0].max_size = 256
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 1
dataloader.test.dataset.names = "shapes_val"
dataloader.test.mapper.augmentations[0].short_edge_length = 128
dataloader.test.mapper.augmentations[0].max_size = 256
dataloader.test.num_workers = 1
dataloader.evaluator.output_dir = "${...train.output_dir}/inference"

optimizer.lr = 0.02
train.max_iter = 500
train.device = "cpu"
train.seed = 42  # deterministic, like the yacs config
train.init_checkpoint = ""
train.output_dir = "./output/shapes_lazy"
train.checkpointer.period = 100
train.eval_period = 0
train.log_period = 20
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[400, 470], num_updates="${train.max_iter}"
    ),
    warmup_length=50 / 500,
    warmup_factor=0.001,
)
