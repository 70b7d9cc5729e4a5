"""The torchvision conv-net zoo and the input size each model needs (small, to keep tests fast)."""

from __future__ import annotations

import torch
import torchvision

#: transformers: a LayerNorm over the embedding makes their plans not exact (output shapes
#: are checked); swin and maxvit keep their heads (a size computed from the input width, einsum)
TRANSFORMERS = ("vit_", "swin_", "maxvit")

#: models whose smallest useful input is larger than the default
INPUT_SIZE = {"inception_v3": 299}  # its training-only aux head needs 299

#: default suite: one or more models for every pattern (residual, concat, grouped/depthwise,
#: channel shuffle, SE gates, layer scale + LayerNorm, flatten -> Linear, aux heads, fire modules)
DEFAULT = [
    "resnet18", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
    "regnet_x_400mf", "regnet_y_400mf", "shufflenet_v2_x0_5", "squeezenet1_1", "densenet121",
    "googlenet", "inception_v3", "convnext_tiny", "mnasnet0_5", "alexnet", "vgg11_bn",
    "vit_b_16", "swin_t", "maxvit_t",
]


def conv_nets() -> list[str]:
    return [n for n in classifiers() if not n.startswith(TRANSFORMERS)]


def classifiers() -> list[str]:
    """Every classification model of torchvision (conv nets and transformers)."""
    return torchvision.models.list_models(module=torchvision.models)


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    kwargs = {"aux_logits": True, "init_weights": True} if name in ("googlenet",
                                                                     "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    size = 224 if name.startswith(TRANSFORMERS) else INPUT_SIZE.get(name, 64)
    return model, torch.randn(1, 3, size, size)


#: a sample of timm architectures users bring (tests/test_timm.py, benchmarks/prune_time.py)
TIMM_40 = ["seresnext26d_32x4d", "ecaresnet26t", "gcresnet33ts", "resnetaa50d", "resnetblur18",
    "regnetz_b16", "regnetv_040", "tf_efficientnetv2_b0", "efficientnet_lite0",
    "mobilenetv4_conv_small", "mobilenetv2_050", "mnasnet_100", "spnasnet_100", "semnasnet_075",
    "fbnetv3_b", "ghostnetv2_100", "repghostnet_050", "hgnet_tiny", "hgnetv2_b0", "cs3darknet_s",
    "darknet53", "vovnet39a", "dla46_c", "res2next50", "resnest26d", "repvit_m0_9", "starnet_s1",
    "fasternet_t0", "mambaout_femto", "rdnet_tiny", "tresnet_m", "legacy_seresnet18",
    "nf_regnet_b0", "dm_nfnet_f0", "inception_v3", "convnextv2_atto", "convformer_s18",
    "visformer_tiny", "mobilevitv2_050", "halonet26t"]

#: timm transformers and attention hybrids: heads and MLPs prune (tests/test_timm.py)
TIMM_ATTENTION = ["botnet26t_256", "lambda_resnet26t", "efficientformerv2_s0", "tiny_vit_5m_224",
                  "pit_ti_224", "caformer_s18", "pvt_v2_b0", "twins_pcpvt_small",
                  "coatnet_nano_rw_224", "maxvit_nano_rw_256", "deit_tiny_patch16_224",
                  "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "levit_128s",
                  "efficientvit_m0", "shvit_s1"]

#: where every head stays and each narrows instead (why: the source line): per-head convolutions
#: (efficientvit), single-head attention (shvit), a head width computed from the input width
#: (twins: ``C // self.num_heads``, which follows the embedding)
TIMM_HEADS_KEPT = ["efficientvit_m0", "shvit_s1", "twins_pcpvt_small", "lambda_resnet26t"]

#: attention left whole: a lambda layer reshapes heads x values back to its *input* width
#: (``reshape(B, C, H, W)``) while its keys and values are shared by every head
TIMM_ATTENTION_HELD = ["lambda_resnet26t"]

#: torchvision detectors, pruned as whole models (tests/test_detectors.py, benchmarks/)
DETECTORS = ["fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large",
             "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2",
             "fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn",
             "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn", "ssd300_vgg16",
             "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "keypointrcnn_resnet50_fpn"]
