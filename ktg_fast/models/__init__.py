"""Networks for knowledge transfer graphs: CIFAR ResNets, Wide ResNets and a registry by name.

    from ktg_fast.models import get_model
    net = get_model("ResNet32", num_classes=100)          # or "wrn28_2", "resnet8", ...
    net = get_model("wrn16_2", num_classes=10, in_channels=1)
"""
from .registry import (
    ModelFactory,
    UnknownModelError,
    available_models,
    canonical_model_name,
    get_model,
    is_model,
    register_model,
    unregister_model,
)
from .resnet import BasicBlock, CifarResNet
from .wide_resnet import WideBlock, WideResNet

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "ModelFactory",
    "UnknownModelError",
    "WideBlock",
    "WideResNet",
    "available_models",
    "canonical_model_name",
    "get_model",
    "is_model",
    "register_model",
    "unregister_model",
]
