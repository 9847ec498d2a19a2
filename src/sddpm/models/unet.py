"""The spiking U-Net of SDDPM (Cao et al., WACV 2024) and its ANN twin.

Tensors between blocks are ``[S, B, C, H, W]`` floats, S the number of SNN time steps. Every
conv except the first is fed by a spiking neuron; conv + BatchNorm run on the folded
``[S*B, C, H, W]`` tensor, so BatchNorm statistics pool all SNN steps (as published). Residual
paths stay real-valued. The ANN twin is the same network with S = 1 and a real activation in
place of every neuron.

The model owns its neuron state: every call starts from membrane potential at rest, so two
identical calls return identical outputs and no batch influences the next.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..snn import SpikeConv2d, SpikingNeuron, Surrogate
from .config import UNetConfig
from .labels import check_label_tensor, check_label_values
from .memory_format import laid_out
from .tsm import TSM_CONVS, add_step_scales


def _fold(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(0, 1)


def _unfold(x: torch.Tensor, steps: int) -> torch.Tensor:
    return x.unflatten(0, (steps, -1))


def _is_nhwc(x: torch.Tensor) -> bool:
    """Whether a feature map ``[N, C, H, W]`` with several channels is laid out channels-last."""
    return x.shape[1] > 1 and x.stride(1) == 1


def _concat_channels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[S, B, C1, H, W]`` and ``[S, B, C2, H, W]`` -> ``[S, B, C1 + C2, H, W]``, joined on the
    folded 4-D tensors so that a channels-last layout survives (a 5-D cat would not keep it)."""
    return _unfold(torch.cat([_fold(a), _fold(b)], dim=1), a.shape[0])


def _conv_bn(conv: nn.Module, bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """conv then BatchNorm on the folded SNN axis: ``[S, B, C, H, W]`` in and out."""
    return _unfold(bn(conv(_fold(x))), x.shape[0])


def _batch_norm_repeated(bn: nn.BatchNorm2d, y: torch.Tensor, repeats: int) -> torch.Tensor:
    """Train-mode ``bn`` on ``y`` repeated ``repeats`` times along the batch, without the copies.

    The normalisation is the same (mean and biased variance do not change under repetition);
    the running variance uses the unbiased estimate over all ``repeats * N*H*W`` values, as
    BatchNorm on the repeated tensor would. Statistics are accumulated in float32 (16-bit ``y``
    under autocast), as ``nn.BatchNorm2d`` accumulates them."""
    out = F.batch_norm(y, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            n = repeats * y.numel() // y.shape[1]
            wide = y.float() if y.dtype in (torch.float16, torch.bfloat16) else y
            var, mean = torch.var_mean(wide, (0, 2, 3), unbiased=False)
            var = var * (n / max(n - 1, 1))
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1 / bn.num_batches_tracked
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), float(momentum))
            bn.running_var.lerp_(var.to(bn.running_var.dtype), float(momentum))
    return out


def sinusoidal_table(num_steps: int, dim: int) -> torch.Tensor:
    """``[num_steps, dim]``; row t is ``[sin(t w_0), cos(t w_0), sin(t w_1), ...]`` with
    ``w_k = exp(-(2k / dim) ln 10000)`` (the published DDPM embedding, float32)."""
    freqs = torch.exp(-torch.arange(0, dim, 2) / dim * math.log(10000))
    angles = torch.arange(num_steps).float()[:, None] * freqs[None, :]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(num_steps, dim)


class TimeEmbedding(nn.Module):
    """Diffusion step t -> ``[B, 4 ch]``: frozen sinusoidal table, Linear, Swish, Linear."""

    def __init__(self, num_steps: int, ch: int, dim: int) -> None:
        super().__init__()
        # A frozen parameter (not a buffer) as published, so it counts in the parameters and
        # appears in checkpoints under the published name.
        self.table = nn.Parameter(sinusoidal_table(num_steps, ch), requires_grad=False)
        self.proj_in = nn.Linear(ch, dim)
        self.proj_out = nn.Linear(dim, dim)
        for lin in (self.proj_in, self.proj_out):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.proj_out(F.silu(self.proj_in(F.embedding(t, self.table))))


def _xavier(*modules: nn.Module) -> None:
    for m in modules:
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)


class Stem(nn.Module):
    """Image -> first feature map: conv + BN (real input), neuron, conv + BN."""

    def __init__(self, in_ch: int, ch: int, make_neuron, conv) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.bn = nn.BatchNorm2d(ch)
        self.neuron = make_neuron()
        self.conv2 = conv(ch, ch, 3, padding=1)  # published `conv_identity`, default init
        self.bn2 = nn.BatchNorm2d(ch)
        _xavier(self.conv)

    def forward(self, x: torch.Tensor, steps: int) -> torch.Tensor:
        """``x [B, C, H, W]`` (the same image on every SNN step) -> ``[S, B, ch, H, W]``.

        The published model repeats the image S times before the first conv; every copy gives
        the same conv output and the same BatchNorm batch statistics, so conv and BatchNorm run
        once and the result is broadcast over the S steps. A TSM conv (SDM) also runs once; its
        per-step scales make the S maps differ, so BatchNorm then sees all S*B of them."""
        if isinstance(self.conv, TSM_CONVS):  # a TSMRepeatedConv2d: [B] in, [S*B] out
            h = _unfold(self.bn(self.conv(x)), steps)
            return _conv_bn(self.conv2, self.bn2, self.neuron(h))
        y = self.conv(x)
        if self.training and isinstance(self.bn, nn.BatchNorm2d):
            y = _batch_norm_repeated(self.bn, y, steps)
        else:
            y = self.bn(y)
        h = y.unsqueeze(0).expand(steps, *y.shape)
        return _conv_bn(self.conv2, self.bn2, self.neuron(h))


class ResBlock(nn.Module):
    """``bn1(conv1(IF(x))) + time projection``, then ``bn2(conv2(IF(.)))``, plus a real-valued
    shortcut of x (1x1 conv with bias when the width changes)."""

    def __init__(self, in_ch: int, out_ch: int, tdim: int, make_neuron, conv) -> None:
        super().__init__()
        self.neuron1 = make_neuron()
        self.conv1 = conv(in_ch, out_ch, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.time_proj = nn.Linear(tdim, out_ch)  # applied to swish(temb)
        self.neuron2 = make_neuron()
        self.conv2 = conv(out_ch, out_ch, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        _xavier(self.conv1, self.conv2, self.time_proj)
        if isinstance(self.skip, nn.Conv2d):
            _xavier(self.skip)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = _conv_bn(self.conv1, self.bn1, self.neuron1(x))
        h = h + self.time_proj(F.silu(temb))[None, :, :, None, None]
        h = _conv_bn(self.conv2, self.bn2, self.neuron2(h))
        return h + _unfold(self.skip(_fold(x)), x.shape[0])


class Downsample(nn.Module):
    """``bn(conv(IF(x)))`` with a 3x3 stride-2 conv."""

    def __init__(self, ch: int, make_neuron, conv) -> None:
        super().__init__()
        self.neuron = make_neuron()
        self.conv = conv(ch, ch, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(ch)
        _xavier(self.conv)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return _conv_bn(self.conv, self.bn, self.neuron(x))


class Upsample(nn.Module):
    """``bn(conv(nearest_x2(IF(x))))`` with a 3x3 conv."""

    def __init__(self, ch: int, make_neuron, conv) -> None:
        super().__init__()
        self.neuron = make_neuron()
        self.conv = conv(ch, ch, 3, padding=1)
        self.bn = nn.BatchNorm2d(ch)
        _xavier(self.conv)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        s = self.neuron(x)
        up = F.interpolate(_fold(s), scale_factor=2, mode="nearest")
        return _unfold(self.bn(self.conv(up)), x.shape[0])


class _DecayedStepSum(torch.autograd.Function):
    """``sum_i w_i out[i]`` over the SNN steps of ``out [S, B, C, H, W]``, for constant weights
    ``w [S]``, in each step's layout (channels-last stays channels-last) both ways. Autograd's
    own backward of this sum (or of indexing the steps) would build NCHW gradients, which a
    channels-last model's head convs would then have to transpose.

    Traced (``torch.compile``), the forward returns a plain sum, not ``out=``'s result (the
    compiler picks the layout itself): Dynamo 2.11 loses the gradient of an autograd Function
    output that an aliasing op returns, so every parameter got a zero gradient."""

    @staticmethod
    def forward(ctx, out, weights):
        step = torch.empty_like(out[0])
        ctx.save_for_backward(weights)
        ctx.layout = (out.shape, (step.numel(), *step.stride()), out.dtype, out.device)
        if torch.compiler.is_compiling():
            return (out * weights.view(-1, 1, 1, 1, 1)).sum(dim=0)
        return torch.sum(out * weights.view(-1, 1, 1, 1, 1), dim=0, out=step)

    @staticmethod
    def backward(ctx, grad):
        (weights,) = ctx.saved_tensors
        shape, strides, dtype, device = ctx.layout
        grad_out = torch.empty_strided(shape, strides, dtype=dtype, device=device)
        for i in range(shape[0]):
            torch.mul(grad, weights[i], out=grad_out[i])
        return grad_out, None


class Head(nn.Module):
    """``bn, swish, conv`` to image channels (per SNN step), then the published temporal layer:
    ``h + swish(bn(conv3x3(h)))`` per step, and the decayed sum over SNN steps."""

    def __init__(self, ch: int, out_ch: int, decay: float) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(ch)
        self.conv = nn.Conv2d(ch, out_ch, 3, padding=1)
        # Published `T_output_layer`: a Conv3d with kernel (3, 3, 1) over [B, C, H, W, S]; it
        # never mixes SNN steps, so it is a 3x3 conv per step. Kept as Conv3d for the weights'
        # shape; computed as conv2d.
        self.temporal_conv = nn.Conv3d(out_ch, out_ch, (3, 3, 1), padding=(1, 1, 0))
        self.temporal_bn = nn.BatchNorm2d(out_ch)
        self.decay = decay
        nn.init.xavier_uniform_(self.conv.weight, gain=1e-5)
        nn.init.zeros_(self.conv.bias)

    def forward(self, h_seq: torch.Tensor) -> torch.Tensor:
        steps = h_seq.shape[0]
        h = self.conv(F.silu(self.bn(_fold(h_seq))))
        w = self.temporal_conv.weight.squeeze(-1)
        if _is_nhwc(h):  # a channels-last model: a weight to match
            w = laid_out(w, torch.channels_last)
        z = self.temporal_bn(F.conv2d(h, w, self.temporal_conv.bias, padding=1))
        out = _unfold(F.silu(z) + h, steps)
        weights = self.decay ** torch.arange(steps - 1, -1, -1, dtype=out.dtype, device=out.device)
        return _DecayedStepSum.apply(out, weights)


class UNet(nn.Module):
    """The SDDPM U-Net: ``model(x_t [B,C,H,W], t [B] int, y=None) -> eps [B,C,H,W]``.

    A class-conditional model (``config.num_classes = N > 0``) adds a learned class embedding
    (``class_embed``, ``N + 1`` rows of width ``4 ch``; row ``N`` is the null class) to the time
    embedding; ``y [B]`` int64 in ``0..N``, ``None`` meaning the null class for every image.

    Build it with :func:`sddpm.models.build_model` (or :class:`SpikingUNet` / :class:`ANNUNet`).

    ``check_t_values`` (default ``True``): check every ``t`` lies in ``[0, diffusion_steps)``
    (CPU tensors only). A caller that draws ``t`` itself and has checked its range on the host
    (the trainer) sets it to ``False``, so that a training step reads nothing back.
    ``check_y_values`` (default ``True``): the same for the labels ``y`` (the trainer's come
    from a dataset whose labels were checked when read, and label dropout gives the null class).
    ``memory_format``: the layout the network computes in (set it with
    :func:`sddpm.models.set_memory_format`); its input is laid out so on entry.
    """

    check_t_values: bool = True
    check_y_values: bool = True
    memory_format: torch.memory_format = torch.contiguous_format  # see set_memory_format

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        tdim = c.time_embed_dim
        make = self._neuron_factory()
        # Convs behind a neuron: spike-fed (input saved as bool for backward) when spiking.
        conv = SpikeConv2d if c.kind == "spiking" else nn.Conv2d
        self.time_embed = TimeEmbedding(c.diffusion_steps, c.channels, tdim)
        self.stem = Stem(c.image_channels, c.channels, make, conv)

        self.encoder = nn.ModuleList()
        skip_channels = [c.channels]
        now = c.channels
        for level, mult in enumerate(c.channel_mult):
            out = c.channels * mult
            for _ in range(c.num_res_blocks):
                self.encoder.append(ResBlock(now, out, tdim, make, conv))
                now = out
                skip_channels.append(now)
            if level != len(c.channel_mult) - 1:
                self.encoder.append(Downsample(now, make, conv))
                skip_channels.append(now)

        self.middle = nn.ModuleList([ResBlock(now, now, tdim, make, conv) for _ in range(2)])

        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            out = c.channels * mult
            for _ in range(c.num_res_blocks + 1):
                self.decoder.append(ResBlock(skip_channels.pop() + now, out, tdim, make, conv))
                now = out
            if level != 0:
                self.decoder.append(Upsample(now, make, conv))
        assert not skip_channels

        self.head = Head(now, c.image_channels, c.output_decay)
        if c.tsm:
            add_step_scales(self, c.snn_timesteps, repeated_input=("stem.conv",))
        # Built last, so the other parameters draw the same initial values as the unconditional
        # model's under the same seed; absent when unconditional (published state_dict keys).
        if c.num_classes > 0:
            self.class_embed = nn.Embedding(c.num_classes + 1, tdim)

    def _neuron_factory(self):
        c = self.config
        if c.kind == "ann":
            act = {"silu": nn.SiLU, "relu": nn.ReLU}[c.ann_activation]
            return act
        n = c.neuron
        surrogate = Surrogate(n.surrogate, n.surrogate_width)

        def make() -> SpikingNeuron:
            return SpikingNeuron(
                threshold=n.threshold,
                tau=n.tau,
                reset=n.reset,
                v_reset=n.v_reset,
                detach_reset=n.detach_reset,
                surrogate=surrogate,
            )

        return make

    @property
    def time_steps(self) -> int:
        """SNN time steps this network runs (1 for the ANN twin)."""
        return self.config.effective_timesteps

    def validate_input(
        self, x: torch.Tensor, t: torch.Tensor | None = None, y: torch.Tensor | None = None
    ) -> None:
        """Raise ``ValueError`` naming what is allowed if ``x`` (and ``t``, ``y``) cannot be
        processed. Values of ``t`` and ``y`` are checked for CPU tensors only (no device sync);
        check labels on the host with :func:`sddpm.models.check_labels`."""
        c = self.config
        m = c.size_multiple
        if x.dim() != 4:
            raise ValueError(f"expected x of shape [B, C, H, W], got {tuple(x.shape)}")
        if x.shape[1] != c.image_channels:
            raise ValueError(
                f"this model takes {c.image_channels}-channel images, got {x.shape[1]} channels "
                f"(x of shape {tuple(x.shape)})"
            )
        h, w = x.shape[-2:]
        if h % m or w % m or h < m or w < m:
            raise ValueError(
                f"image size {h}x{w} cannot be halved {len(c.channel_mult) - 1} times: height "
                f"and width must be multiples of {m} ({m}, {2 * m}, {3 * m}, ...)"
            )
        if t is not None:
            if t.shape != (x.shape[0],):
                raise ValueError(f"expected t of shape [{x.shape[0]}], got {tuple(t.shape)}")
            if t.dtype.is_floating_point or t.dtype == torch.bool:
                raise ValueError(f"t must hold integer diffusion steps, got dtype {t.dtype}")
            # The value check reads t on the host: done for CPU tensors only, so that a GPU
            # step never waits on a device sync and torch.compile sees no graph break.
            if (
                self.check_t_values
                and t.numel()
                and t.device.type == "cpu"
                and not torch.compiler.is_compiling()
                and (int(t.min()) < 0 or int(t.max()) >= c.diffusion_steps)
            ):
                raise ValueError(
                    f"t must be in [0, {c.diffusion_steps - 1}], got values "
                    f"{int(t.min())}..{int(t.max())}"
                )
        if y is not None:
            check_label_tensor(y, x.shape[0], c.num_classes)
            if self.check_y_values and y.device.type == "cpu" and not torch.compiler.is_compiling():
                check_label_values(y, c.num_classes)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        self.validate_input(x, t, y)
        x = laid_out(x, self.memory_format)
        temb = self.time_embed(t)
        if self.config.num_classes > 0:
            if y is None:
                y = torch.full_like(t, self.config.num_classes, dtype=torch.int64)
            temb = temb + self.class_embed(y.to(torch.int64))
        steps = self.time_steps
        h = self.stem(x, steps)
        skips = [h]
        for block in self.encoder:
            h = block(h, temb)
            skips.append(h)
        for block in self.middle:
            h = block(h, temb)
        for block in self.decoder:
            if isinstance(block, ResBlock):
                h = _concat_channels(h, skips.pop())
            h = block(h, temb)
        return self.head(h)


class SpikingUNet(UNet):
    """The spiking U-Net (``config.kind`` must be ``"spiking"``)."""

    def __init__(self, config: UNetConfig) -> None:
        if config.kind != "spiking":
            raise ValueError(f"SpikingUNet needs kind='spiking', got {config.kind!r}")
        super().__init__(config)


class ANNUNet(UNet):
    """The ANN twin: same layers and parameters, real activations, no SNN time axis."""

    def __init__(self, config: UNetConfig) -> None:
        if config.kind != "ann":
            config = config.replace(kind="ann")
        super().__init__(config)


def build_model(config: UNetConfig) -> UNet:
    """The spiking U-Net or its ANN twin, as ``config.kind`` says."""
    return SpikingUNet(config) if config.kind == "spiking" else ANNUNet(config)


def count_parameters(model: nn.Module) -> int:
    """All parameters, the frozen embedding table included (as the published count)."""
    return sum(p.numel() for p in model.parameters())
