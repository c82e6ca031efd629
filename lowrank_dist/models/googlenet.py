"""GoogLeNet (Inception v1), torchvision's architecture; BatchNorm is built in (BasicConv2d is
conv → BN → ReLU, so a factorized conv gives the authors' conv_v → conv_h → BN → ReLU)."""

from torch import nn
from torchvision.models import googlenet as tv_googlenet

from .layer_names import conv_layers
from .registry import register_model

# BVLC GoogLeNet's layer names (Szegedy et al.'s prototxt) for torchvision's modules.
STEM_NAMES = {
    "conv1.conv": "conv1/7x7_s2", "conv2.conv": "conv2/3x3_reduce", "conv3.conv": "conv2/3x3",
    "aux1.conv.conv": "loss1/conv", "aux2.conv.conv": "loss2/conv",
}
INCEPTIONS = ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b")
BRANCH_NAMES = {
    "branch1.conv": "1x1",
    "branch2.0.conv": "3x3_reduce", "branch2.1.conv": "3x3",
    # torchvision's third branch has a 3×3 conv where the paper's has a 5×5 (kept by torchvision for
    # its pretrained weights); it is named by the slot it fills, so "5x5" here is a 3×3 kernel
    "branch3.0.conv": "5x5_reduce", "branch3.1.conv": "5x5",
    "branch4.1.conv": "pool_proj",  # branch4.0 is the 3×3 max pool
}
LAYER_NAMES = STEM_NAMES | {
    f"inception{module}.{branch}": f"inception_{module}/{slot}"
    for module in INCEPTIONS for branch, slot in BRANCH_NAMES.items()
}


def layer_names(model: nn.Module) -> dict[str, str]:
    """The paper's names of the convs the model has (the auxiliary heads' only with aux_logits)."""
    names = {}
    for path, _ in conv_layers(model):
        if path not in LAYER_NAMES:
            raise ValueError(f"googlenet: no paper name for the conv {path!r}; known: {', '.join(LAYER_NAMES)}")
        names[path] = LAYER_NAMES[path]
    return names


# Szegedy et al. 2015: each auxiliary classifier's loss is added with weight 0.3 in training
@register_model("googlenet", options={"aux_logits": False}, aux_loss_weight=0.3, layer_names=layer_names)
def googlenet(num_classes: int = 1000, batch_norm: bool = True, aux_logits: bool = False) -> nn.Module:
    if not batch_norm:
        raise ValueError("googlenet: torchvision's GoogLeNet always has BatchNorm; batch_norm must be true")
    return tv_googlenet(
        weights=None, num_classes=num_classes, aux_logits=aux_logits, transform_input=False, init_weights=True
    )
