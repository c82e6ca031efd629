"""VGG-16, torchvision's vgg16 / vgg16_bn, optionally with BN after fc6 and fc7 as in the authors'
VGG-16-BN (`fc_batch_norm`; torchvision's vgg16_bn has BN after the convs only)."""

from torch import nn
from torchvision.models import vgg16 as tv_vgg16, vgg16_bn as tv_vgg16_bn

from .layer_names import in_order
from .registry import Preset, register_model

# The authors' (and Oxford's Caffe model's) names: conv<block>_<index>, blocks split by the max pools.
LAYER_NAMES = [f"conv{block}_{index}" for block, convs in enumerate((2, 2, 3, 3, 3), 1) for index in range(1, convs + 1)]

# Tai et al.'s three rank settings for conv1_1 .. conv5_3. The first is the one of their released
# config (chengtaipu/lowrankcnn, imagenet/models_vgg/config.json); the other two, one with higher and one
# with lower ranks, are named by the theoretical conv speedup they give at 224×224 (speed.costs;
# 3.10× for the released one).
TAI2016_RANKS = [5, 24, 48, 48, 64, 128, 160, 192, 192, 256, 320, 320, 320]
TAI2016_2_4X_RANKS = [  # 2.42×
    5, 32, 64, 64, 96, 160, 192, 256, 256, 320, 384, 384, 384]
TAI2016_4_0X_RANKS = [  # 3.97×
    5, 24, 32, 48, 64, 96, 96, 128, 192, 192, 192, 192, 192]
# Not the paper's (its models keep fc6/fc7 dense): the released convs, and fc6/fc7 at rank 256, which
# cuts the gradients all-reduced per step ~7× (docs/benchmarks.md#gradient-bytes-per-step).
TAI2016_FC256 = Preset(tuple(TAI2016_RANKS), {"fc6": 256, "fc7": 256})


def _with_fc_batch_norm(classifier: nn.Sequential) -> nn.Sequential:
    """fc6 → BN → ReLU → dropout → fc7 → BN → ReLU → dropout → fc8 from torchvision's classifier."""
    layers = []
    for layer in classifier:
        layers.append(layer)
        if isinstance(layer, nn.Linear) and layer is not classifier[-1]:
            layers.append(nn.BatchNorm1d(layer.out_features))
    return nn.Sequential(*layers)


@register_model(
    "vgg16",
    presets={"tai2016": TAI2016_RANKS, "tai2016_2.4x": TAI2016_2_4X_RANKS, "tai2016_4.0x": TAI2016_4_0X_RANKS,
             "tai2016_fc256": TAI2016_FC256},
    options={"fc_batch_norm": False},
    layer_names=in_order(*LAYER_NAMES),
    fc_names=("fc6", "fc7"),
)
def vgg16(num_classes: int = 1000, batch_norm: bool = False, dropout: float = 0.5, fc_batch_norm: bool = False) -> nn.Module:
    build = tv_vgg16_bn if batch_norm else tv_vgg16
    model = build(weights=None, num_classes=num_classes, dropout=dropout)
    if fc_batch_norm:
        model.classifier = _with_fc_batch_norm(model.classifier)
    return model
