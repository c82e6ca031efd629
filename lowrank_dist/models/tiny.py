"""Small CNNs for the debug config and CPU tests. tiny_vgg: four 3×3 conv blocks with BN, global
average pooling and one linear layer; tiny_caffenet: CaffeNet's shape (convs, then fc6 and fc7 and
the class layer), so that low-rank FC layers train on a CPU too. Not paper models; they exist so the
whole training path runs on a laptop CPU in a minute."""

from torch import nn

from .layer_names import in_order
from .registry import Preset, register_model


@register_model("tiny_vgg", input_size=(3, 32, 32), num_classes=10, layer_names=in_order("conv1", "conv2", "conv3", "conv4"))
def tiny_vgg(num_classes: int = 10, batch_norm: bool = True, dropout: float = 0.0) -> nn.Module:
    layers, channels = [], 3
    for width, pool in ((32, True), (64, True), (128, False), (128, True)):
        layers.append(nn.Conv2d(channels, width, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU(inplace=True))
        if pool:
            layers.append(nn.MaxPool2d(2))
        channels = width
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes)
    )


@register_model("tiny_caffenet", input_size=(3, 32, 32), num_classes=10,
                presets={"fc32": Preset((None, 16, 16), {"fc6": 32, "fc7": 32})},
                layer_names=in_order("conv1", "conv2", "conv3"), fc_names=("fc6", "fc7"))
def tiny_caffenet(num_classes: int = 10, batch_norm: bool = True, dropout: float = 0.0) -> nn.Module:
    """CaffeNet-BN's shape, small, for CPU tests of low-rank FC layers: three 3×3 conv blocks (16, 32,
    32 channels, each pooled), then fc6 and fc7 256 wide with BN, and the class layer (32×32 inputs)."""
    layers, channels = [], 3
    for width in (16, 32, 32):
        layers += [nn.Conv2d(channels, width, 3, padding=1)] + ([nn.BatchNorm2d(width)] if batch_norm else [])
        layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        channels = width
    fc = []
    for width_in, width in ((channels * 4 * 4, 256), (256, 256)):
        fc += [nn.Linear(width_in, width)] + ([nn.BatchNorm1d(width)] if batch_norm else [])
        fc += [nn.ReLU(inplace=True), nn.Dropout(dropout)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten(), *fc, nn.Linear(256, num_classes))
