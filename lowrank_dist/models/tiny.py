"""A small VGG-style CNN for the debug config and CPU tests: four 3×3 conv blocks with BN, global
average pooling and one linear layer. Not a paper model; it exists so the whole training path runs
on a laptop CPU in a minute."""

from torch import nn

from .layer_names import in_order
from .registry import register_model


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
