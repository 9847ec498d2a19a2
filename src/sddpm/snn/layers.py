"""Layers fed by spikes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _SpikeConv2dFunction(torch.autograd.Function):
    """conv2d whose input is binary: saved for the backward pass as bool (1 byte, not 4)."""

    @staticmethod
    def forward(ctx, spikes, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(spikes.to(torch.bool), weight)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        ctx.input_dtype = spikes.dtype
        return F.conv2d(spikes, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        spikes, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad_in = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_in = torch.nn.grad.conv2d_input(
                spikes.shape, weight, grad_out, stride, padding, dilation, groups
            ).to(ctx.input_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = torch.nn.grad.conv2d_weight(
                spikes.to(grad_out.dtype), weight.shape, grad_out, stride, padding, dilation, groups
            )
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_in, grad_w, grad_b, None, None, None, None


class SpikeConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` for binary (spike) input: same parameters and results, but the input
    kept for the backward pass is stored as bool. Feed it only 0/1 tensors."""

    def forward(self, spikes: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros" or not torch.is_grad_enabled():
            return super().forward(spikes)
        return _SpikeConv2dFunction.apply(
            spikes, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )
