"""The torchvision conv-net zoo and the input size each model needs (small, to keep tests fast)."""

from __future__ import annotations

import torch
import torchvision

EXCLUDED_PREFIXES = ("vit_", "swin_", "maxvit")  # transformers: a later issue

#: models whose smallest useful input is larger than the default
INPUT_SIZE = {"inception_v3": 299}  # its training-only aux head needs 299

#: default suite: one or more models for every pattern (residual, concat, grouped/depthwise,
#: channel shuffle, SE gates, layer scale + LayerNorm, flatten -> Linear, aux heads, fire modules)
DEFAULT = [
    "resnet18", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
    "regnet_x_400mf", "regnet_y_400mf", "shufflenet_v2_x0_5", "squeezenet1_1", "densenet121",
    "googlenet", "inception_v3", "convnext_tiny", "mnasnet0_5", "alexnet", "vgg11_bn",
]


def conv_nets() -> list[str]:
    return [n for n in torchvision.models.list_models(module=torchvision.models)
            if not n.startswith(EXCLUDED_PREFIXES)]


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    kwargs = {"aux_logits": True, "init_weights": True} if name in ("googlenet",
                                                                     "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    size = INPUT_SIZE.get(name, 64)
    return model, torch.randn(1, 3, size, size)
