"""VGG-16, torchvision's vgg16 / vgg16_bn."""

from torch import nn
from torchvision.models import vgg16 as tv_vgg16, vgg16_bn as tv_vgg16_bn

from .registry import register_model

# Tai et al., VGG-16 ranks for conv1_1 .. conv5_3 (DESIGN.md §1).
TAI2016_RANKS = [5, 24, 48, 48, 64, 128, 160, 192, 192, 256, 320, 320, 320]


@register_model("vgg16", presets={"tai2016": TAI2016_RANKS})
def vgg16(num_classes: int = 1000, batch_norm: bool = False, dropout: float = 0.5) -> nn.Module:
    build = tv_vgg16_bn if batch_norm else tv_vgg16
    return build(weights=None, num_classes=num_classes, dropout=dropout)
