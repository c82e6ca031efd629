"""CaffeNet (BVLC's single-GPU AlexNet variant) as Tai et al. trained it: CaffeNet-BN.

The authors' prototxts (chengtaipu/lowrankcnn, imagenet/models_caffenet): convs 96/256/384/384/256
with kernels 11/5/3/3/3, conv1 stride 4 without padding; conv2, conv4 and conv5 in 2 groups (the
two GPUs of the original AlexNet); max pooling 3/2 then LRN (5, 1e-4, 0.75) after conv1 and conv2;
fc6 and fc7 4096 wide with dropout 0.5; 227×227 inputs. The BN variant (the default, the one the
paper's 80.03 → 80.56 top-5 is about) puts BN after every conv and after fc6 and fc7;
`batch_norm: false` is the plain CaffeNet. Pooling rounds up like Caffe's, which changes no size
at 227 and lets small test images through. Weights start from Caffe's Gaussian fillers (std 0.01,
fc6/fc7 0.005); without BN the biases of conv2/4/5 and fc6/fc7 start at 1, as in BVLC's CaffeNet.

The authors' ranks 8, 40, 60, 100, 200 count the vertical filters of all groups together (their
conv2_v has num_output 40 with group 2: 20 per group), which is how LowRankConv2d counts a rank.
"""

from torch import nn

from .layer_names import in_order
from .registry import Preset, register_model

# Tai et al., imagenet/models_caffenet/config.json: conv1..conv5, totals over the groups.
TAI2016_RANKS = [8, 40, 60, 100, 200]
# Not the paper's (its low-rank models keep fc6/fc7 dense): the same convs, and fc6/fc7 at rank 256,
# which cuts the gradients all-reduced per step ~6× (docs/benchmarks.md#gradient-bytes-per-step).
TAI2016_FC256 = Preset(tuple(TAI2016_RANKS), {"fc6": 256, "fc7": 256})


def _conv(in_channels, out_channels, kernel_size, stride, padding, groups, batch_norm):
    layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    return layers + [nn.ReLU(inplace=True)]


def _fc(in_features, out_features, batch_norm, dropout):
    layers = [nn.Linear(in_features, out_features)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(out_features))
    return layers + [nn.ReLU(inplace=True), nn.Dropout(dropout)]


def _pool_norm():
    return [nn.MaxPool2d(3, 2, ceil_mode=True), nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)]


class CaffeNet(nn.Module):
    def __init__(self, num_classes: int = 1000, batch_norm: bool = True, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            *_conv(3, 96, 11, 4, 0, 1, batch_norm), *_pool_norm(),
            *_conv(96, 256, 5, 1, 2, 2, batch_norm), *_pool_norm(),
            *_conv(256, 384, 3, 1, 1, 1, batch_norm),
            *_conv(384, 384, 3, 1, 1, 2, batch_norm),
            *_conv(384, 256, 3, 1, 1, 2, batch_norm),
            nn.MaxPool2d(3, 2, ceil_mode=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(6)  # the identity at 227×227; other sizes still reach fc6
        self.classifier = nn.Sequential(
            *_fc(256 * 6 * 6, 4096, batch_norm, dropout),
            *_fc(4096, 4096, batch_norm, dropout),
            nn.Linear(4096, num_classes),
        )
        self._caffe_init(batch_norm)

    def _caffe_init(self, batch_norm: bool) -> None:
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        fcs = [m for m in self.classifier if isinstance(m, nn.Linear)]
        for layer in convs + fcs:
            nn.init.normal_(layer.weight, 0.0, 0.005 if layer in fcs[:2] else 0.01)
            nn.init.zeros_(layer.bias)
        if not batch_norm:  # BVLC CaffeNet: bias 1 keeps these ReLUs alive at the start
            for layer in (convs[1], convs[3], convs[4], fcs[0], fcs[1]):
                nn.init.ones_(layer.bias)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model("caffenet", input_size=(3, 227, 227), presets={"tai2016": TAI2016_RANKS, "tai2016_fc256": TAI2016_FC256},
                layer_names=in_order("conv1", "conv2", "conv3", "conv4", "conv5"), fc_names=("fc6", "fc7"))
def caffenet(num_classes: int = 1000, batch_norm: bool = True, dropout: float = 0.5) -> nn.Module:
    return CaffeNet(num_classes, batch_norm, dropout)
