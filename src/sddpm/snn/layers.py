"""Layers fed by spikes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs a convolution or matmul in on ``device_type`` (``"cuda"``,
    ``"cpu"``, ...), or ``None`` where autocast is off there (or has no such device type:
    ``meta``)."""
    # Traced by torch.compile, the device type is a real one (a fake tensor keeps it), and
    # torch 2.11's Dynamo cannot trace is_autocast_available: it breaks the graph at every
    # spike-fed conv, and the recompiles that follow go dynamic.
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


class _SpikeConv2dFunction(torch.autograd.Function):
    """conv2d whose input is binary: saved for the backward pass as bool (1 byte, not 4).

    Its inputs arrive in one dtype (:class:`SpikeConv2d` casts them as autocast would, so
    autocast has nothing left to cast), and forward and backward see that dtype only: cuDNN
    refuses a ``convolution_backward`` whose gradient and weight differ in dtype."""

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
        if torch.compiler.is_compiling():
            # traced (torch.compile): inductor fuses the conversion, and torch 2.11's cannot
            # lower the bool -> uint8 view of the eager path
            spikes = spikes.to(grad_out.dtype)
        else:
            # bool -> uint8 is a free reinterpretation; uint8 -> float is a fast conversion
            # (on a CPU, bool -> float directly is 2.5x slower)
            spikes = spikes.view(torch.uint8).to(grad_out.dtype)
        # one aten call computes the input, weight and bias gradients together
        grad_in, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out,
            spikes,
            weight,
            [weight.shape[0]] if ctx.has_bias else None,
            stride,
            padding,
            dilation,
            False,
            [0, 0],
            groups,
            [
                ctx.needs_input_grad[0],
                ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2],
            ],
        )
        if grad_in is not None:
            grad_in = grad_in.to(ctx.input_dtype)
        return grad_in, grad_w, grad_b, None, None, None, None


class SpikeConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` for binary (spike) input: same parameters and results, but the input
    kept for the backward pass is stored as bool. Feed it only 0/1 tensors.

    Under autocast it computes in autocast's dtype, as ``nn.Conv2d`` does: input, weight and
    bias are cast before the convolution (differentiable casts, so parameter gradients come
    back in the parameters' dtype) and the backward pass sees that one dtype only."""

    def forward(self, spikes: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros" or not torch.is_grad_enabled():
            return super().forward(spikes)
        weight, bias = self.weight, self.bias
        dtype = autocast_dtype(spikes.device.type)
        if dtype is not None:
            spikes, weight = spikes.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        return _SpikeConv2dFunction.apply(
            spikes, weight, bias, self.stride, self.padding, self.dilation, self.groups
        )
