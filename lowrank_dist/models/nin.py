"""Network in Network for CIFAR-10 (Lin et al. 2014), the model of Tai et al.'s CIFAR-10 study:
three 'mlpconv' blocks (a k×k conv followed by two 1×1 convs), global average pooling.

The authors' low-rank NIN (chengtaipu/lowrankcnn, cifar/models/lowrank_nin_cudnn.lua) factorizes
conv1 (5×5, 3 → 192) at rank 10 and conv2 (5×5, 96 → 192) at rank 51 and keeps conv3 (3×3) dense:
the preset `tai2016`. (They apply the 1×5 filters first, then the 5×1; a square kernel costs the
same either way, and LowRankConv2d's vertical-first order spans the same set of rank-K kernels.)

`batch_norm` puts BN after every conv but the class-map conv. Without it the convs keep PyTorch's
default init (uniform ±1/√fan_in, Torch7's too, which the authors used), under which each of the
nine layers shrinks the signal: at the paper's lr 0.01 the net stays at chance. The paper recipes
(configs/paper/nin_cifar10*.yaml) therefore train with BN; their headers say what the authors'
files show."""

from torch import nn

from .layer_names import in_order
from .registry import register_model

# Lin et al.'s Caffe NIN: each mlpconv block is a k×k conv and two 1×1 "cascaded cross channel
# pooling" convs; the last cccp is the class-map conv.
LAYER_NAMES = ["conv1", "cccp1", "cccp2", "conv2", "cccp3", "cccp4", "conv3", "cccp5", "cccp6"]

TAI2016_RANKS = [10, 51, None]  # conv1, conv2, conv3 (dense)


def _mlpconv(in_channels, widths, kernel_size, padding, batch_norm):
    layers = []
    for i, out_channels in enumerate(widths):
        k, p = (kernel_size, padding) if i == 0 else (1, 0)
        layers.append(nn.Conv2d(in_channels, out_channels, k, padding=p))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
        in_channels = out_channels
    return layers


class NIN(nn.Module):
    def __init__(self, num_classes: int = 10, batch_norm: bool = False, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            *_mlpconv(3, (192, 160, 96), 5, 2, batch_norm),
            nn.MaxPool2d(3, 2, ceil_mode=True), nn.Dropout(dropout),
            *_mlpconv(96, (192, 192, 192), 5, 2, batch_norm),
            nn.AvgPool2d(3, 2, ceil_mode=True), nn.Dropout(dropout),
            *_mlpconv(192, (192, 192), 3, 1, batch_norm),
            nn.Conv2d(192, num_classes, 1),  # class maps: no BN or ReLU on the logits
        )
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.features(x)).flatten(1)


@register_model("nin", input_size=(3, 32, 32), num_classes=10, presets={"tai2016": TAI2016_RANKS},
                layer_names=in_order(*LAYER_NAMES))
def nin(num_classes: int = 10, batch_norm: bool = False, dropout: float = 0.5) -> nn.Module:
    return NIN(num_classes, batch_norm, dropout)
