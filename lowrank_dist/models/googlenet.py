"""GoogLeNet (Inception v1), torchvision's architecture; BatchNorm is built in (BasicConv2d is
conv → BN → ReLU, so a factorized conv gives the authors' conv_v → conv_h → BN → ReLU)."""

from torch import nn
from torchvision.models import googlenet as tv_googlenet

from .registry import register_model


# Szegedy et al. 2015: each auxiliary classifier's loss is added with weight 0.3 in training
@register_model("googlenet", options={"aux_logits": False}, aux_loss_weight=0.3)
def googlenet(num_classes: int = 1000, batch_norm: bool = True, aux_logits: bool = False) -> nn.Module:
    if not batch_norm:
        raise ValueError("googlenet: torchvision's GoogLeNet always has BatchNorm; batch_norm must be true")
    return tv_googlenet(
        weights=None, num_classes=num_classes, aux_logits=aux_logits, transform_input=False, init_weights=True
    )
