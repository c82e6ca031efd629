"""AlexNet, torchvision's architecture (64-192-384-256-256 convs), optionally with BatchNorm after
each conv. Not the authors' network: their "AlexNet" is CaffeNet-BN (models/caffenet.py, widths
96-256-384-384-256, grouped convs, BN on fc6/fc7). The preset applies CaffeNet's ranks to these
narrower, ungrouped convs, so its costs and accuracy are not like for like with the paper's."""

from torch import nn
from torchvision.models import AlexNet

from .layer_names import in_order
from .registry import Preset, register_model

# Tai et al.'s CaffeNet ranks for conv1..conv5 (chengtaipu/lowrankcnn, imagenet/models_caffenet/config.json),
# on torchvision's AlexNet.
TAI2016_RANKS = [8, 40, 60, 100, 200]
# Not the paper's: the same convs, and fc6/fc7 at rank 256 (fewer gradient bytes per step).
TAI2016_FC256 = Preset(tuple(TAI2016_RANKS), {"fc6": 256, "fc7": 256})


def _conv_block(in_channels, out_channels, kernel_size, stride, padding, batch_norm):
    layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    return layers + [nn.ReLU(inplace=True)]


@register_model("alexnet", presets={"tai2016": TAI2016_RANKS, "tai2016_fc256": TAI2016_FC256},
                layer_names=in_order("conv1", "conv2", "conv3", "conv4", "conv5"), fc_names=("fc6", "fc7"))
def alexnet(num_classes: int = 1000, batch_norm: bool = False, dropout: float = 0.5) -> nn.Module:
    model = AlexNet(num_classes=num_classes, dropout=dropout)
    if batch_norm:
        model.features = nn.Sequential(
            *_conv_block(3, 64, 11, 4, 2, True), nn.MaxPool2d(3, 2),
            *_conv_block(64, 192, 5, 1, 2, True), nn.MaxPool2d(3, 2),
            *_conv_block(192, 384, 3, 1, 1, True),
            *_conv_block(384, 256, 3, 1, 1, True),
            *_conv_block(256, 256, 3, 1, 1, True), nn.MaxPool2d(3, 2),
        )
    return model
