"""SDM's temporal-wise spiking mechanism (TSM; Cao et al., "Spiking Diffusion Models",
IEEE TAI 2024, code github.com/AndyCao1125/SDM ``TSM.py``: ``TSMConv2d``).

A TSM conv is an ordinary conv on the folded ``[S*B, C, H, W]`` tensor whose output on SNN
step ``s`` is multiplied by a learnable scalar ``p_s`` (one vector ``p`` of S scalars per
layer, initialised to 1), before the BatchNorm where one follows. With every ``p_s = 1`` the
network computes exactly the plain SDDPM function, which is what fine-tuning starts from.

Our TSM convs are subclasses of the convs they replace (``nn.Conv2d``, ``SpikeConv2d``): the
same ``weight`` and ``bias`` names and behaviour, plus ``step_scale`` ``[S]``. For sampling,
BatchNorm folding (:func:`sddpm.models.fold_batchnorm`) merges an eval-mode BatchNorm exactly:
``bn(p_s (W x + b)) = p_s (W' x + b') + c`` with ``W' = g W / sqrt(var + eps)``,
``b' = g b / sqrt(var + eps)`` and ``c = beta - g mean / sqrt(var + eps)``; ``c`` is kept as
the conv's ``step_shift`` (a per-channel shift added after the scaling).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import skip_init

from ..snn import SpikeConv2d


class _StepScaled:
    """Mixin for a conv class: scale the output of SNN step s by ``step_scale[s]``."""

    step_scale: nn.Parameter
    step_shift: torch.Tensor | None

    def scale_steps(self, y: torch.Tensor) -> torch.Tensor:
        """``y [S, B, C, H, W]`` (this conv's unscaled output per step) -> ``p_s y_s (+ c)``."""
        out = y * self.step_scale.to(y.dtype).view(-1, 1, 1, 1, 1)
        if self.step_shift is not None:
            out = out + self.step_shift.to(y.dtype).view(1, 1, -1, 1, 1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [S*B, C, H, W]`` (SNN steps folded into the batch, step-major) -> ``[S*B, ...]``."""
        y = super().forward(x)
        return self.scale_steps(y.unflatten(0, (self.step_scale.shape[0], -1))).flatten(0, 1)

    def forward_repeated(self, x: torch.Tensor) -> torch.Tensor:
        """The TSM conv of ``x [B, C, H, W]`` repeated on every SNN step, without the copies:
        the conv runs once and is scaled per step. Returns ``[S, B, C', H', W']``."""
        y = super().forward(x)
        return self.scale_steps(y.unsqueeze(0).expand(self.step_scale.shape[0], *y.shape))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, steps: int):
        """A TSM conv sharing ``conv``'s weight and bias Parameters, with ``step_scale`` at 1.

        Draws no random numbers (the model's initialisation is the plain model's)."""
        new = skip_init(
            cls,
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        new.weight = conv.weight
        new.bias = conv.bias
        new.step_scale = nn.Parameter(
            torch.ones(steps, device=conv.weight.device, dtype=conv.weight.dtype)
        )
        new.register_buffer("step_shift", None)
        new.train(conv.training)
        return new

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tsm_steps={self.step_scale.shape[0]}"


class TSMConv2d(_StepScaled, nn.Conv2d):
    """A TSM conv on real-valued input (the stem's first conv, the shortcut, the head's conv)."""


class TSMSpikeConv2d(_StepScaled, SpikeConv2d):
    """A TSM conv fed by spikes (input kept as bool for the backward pass)."""


class TSMRepeatedConv2d(TSMConv2d):
    """The TSM conv of an input that is the same on every SNN step (the stem's first conv,
    fed the image): ``x [B, C, H, W]`` -> ``[S*B, C', H', W']``, the conv run once on the B
    images and scaled per step (:meth:`forward_repeated`). Its conv work is that of B images,
    not S*B; its scale multiplies are S*B*C'*H'*W' as for every TSM conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_repeated(x).flatten(0, 1)


TSM_CONVS = (TSMConv2d, TSMSpikeConv2d)  # TSMRepeatedConv2d is a TSMConv2d


def add_step_scales(model: nn.Module, steps: int, repeated_input: tuple[str, ...] = ()) -> None:
    """Replace, in place, every plain 2-D conv of ``model`` (``nn.Conv2d`` or ``SpikeConv2d``;
    the head's temporal ``Conv3d`` is not one) by its TSM conv with ``steps`` scales at 1; the
    convs named in ``repeated_input`` (fed the same input on every step) by
    :class:`TSMRepeatedConv2d`."""
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) is SpikeConv2d:
                setattr(parent, name, TSMSpikeConv2d.from_conv(child, steps))
            elif type(child) is nn.Conv2d:
                cls = TSMRepeatedConv2d if full in repeated_input else TSMConv2d
                setattr(parent, name, cls.from_conv(child, steps))


def tsm_scale_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every TSM conv of ``model``, in module order.

    Each call of one multiplies every element of its output ``[S*B, C, H, W]`` by the real
    scale of its SNN step (one multiply per output element per step; in a BatchNorm-folded
    model also one add, of ``step_shift``). A :class:`TSMRepeatedConv2d` (the stem) runs its
    conv on the B input images only: conv MACs ``output.numel() / S * fan-in``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TSM_CONVS)]


@torch.no_grad()
def fold_bn_into_tsm_conv(conv: _StepScaled, bn: nn.BatchNorm2d) -> None:
    """Merge eval-mode ``bn`` into the TSM ``conv`` in place (see the module docstring)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    if conv.bias is not None:
        conv.bias.mul_(scale)
    shift = bn.bias - bn.running_mean * scale
    if conv.step_shift is not None:
        shift = shift + conv.step_shift * scale
    conv.step_shift = shift.to(conv.weight.dtype)
