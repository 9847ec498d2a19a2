"""A model prepared for sampling: BatchNorm folded into the conv before it.

In eval mode a BatchNorm after a conv is a per-channel affine map, so it can be merged into
the conv's weights and bias: ``bn(conv(x)) = conv'(x)`` with
``W' = W * g / sqrt(var + eps)`` and ``b' = (b - mean) * g / sqrt(var + eps) + beta``. The
network computes the same function (up to float rounding) with fewer passes over memory.
A TSM conv (SDM) folds with its per-step scales kept: see :mod:`sddpm.models.tsm`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .tsm import TSM_CONVS, fold_bn_into_tsm_conv
from .unet import Downsample, Head, ResBlock, Stem, UNet, Upsample


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d | nn.Conv3d, bn: nn.BatchNorm2d) -> None:
    """Merge eval-mode ``bn`` into ``conv`` in place (conv gains a bias if it had none)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    conv.weight.mul_(scale.view(shape))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (bias - bn.running_mean) * scale + bn.bias
    conv.bias = nn.Parameter(new_bias)


def fold_batchnorm(model: UNet) -> UNet:
    """A copy of ``model`` for sampling, in eval mode, with every conv-then-BatchNorm pair
    merged (the head's BatchNorm before its Swish stays). The original is not modified."""
    folded = copy.deepcopy(model).eval()
    pairs = []
    for m in folded.modules():
        if isinstance(m, Stem):
            pairs += [(m, "conv", "bn"), (m, "conv2", "bn2")]
        elif isinstance(m, ResBlock):
            pairs += [(m, "conv1", "bn1"), (m, "conv2", "bn2")]
        elif isinstance(m, (Downsample, Upsample)):
            pairs += [(m, "conv", "bn")]
        elif isinstance(m, Head):
            pairs += [(m, "temporal_conv", "temporal_bn")]
    for module, conv_name, bn_name in pairs:
        conv = getattr(module, conv_name)
        fold = fold_bn_into_tsm_conv if isinstance(conv, TSM_CONVS) else fold_conv_bn
        fold(conv, getattr(module, bn_name))
        setattr(module, bn_name, nn.Identity())
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded.eval()
