"""A project's config extension, as detectron2 projects have them: new keys and a new model."""

from detectron2.config import CfgNode as CN
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN


@META_ARCH_REGISTRY.register()
class DemoRCNN(GeneralizedRCNN):
    """GeneralizedRCNN under another name: only importing this module registers it."""


def add_demo_config(cfg):
    cfg.MODEL.DEMO = CN()
    cfg.MODEL.DEMO.NOTE = "from add_demo_config"
