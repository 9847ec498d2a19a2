"""The spiking body of the U-Net for one diffusion step, as a NIR graph.

NIR (the Neuromorphic Intermediate Representation, Pedersen et al., Nature Communications 2024;
the ``nir`` package 1.0) is a graph of nodes (convs, affine maps, neurons) and edges; the
edges into one node are summed. :func:`export_nir` writes the part of ``model(x_t, t)`` that
NIR can express, for one fixed t:

- **input** ``input``: the image ``x_t`` ``[C, H, W]``, fed unchanged on every SNN step;
- **output** ``output``: the tensor that enters the head, ``[C', H, W]``, on every SNN step;
- the head (BatchNorm, Swish, conv, the temporal layer and the decayed sum over SNN steps) is
  not expressible in NIR; its weights travel in the graph's metadata and :func:`nir_head`
  finishes the computation: ``nir_head(graph)(h_seq) == model(x_t, t)`` where ``h_seq``
  ``[S, B, C', H, W]`` stacks the output over the S SNN steps.

How the U-Net becomes NIR primitives (all exact rewrites):

- every BatchNorm (eval mode: running statistics) is folded into the conv before it;
- the time embedding for t, ``time_proj(silu(temb(t)))``, is added after a res block's first
  conv + BatchNorm, so it is part of that conv's bias. It is never added before a conv, so no
  bias has to cross a zero-padded border (a bias before a padded conv would not be a bias of
  that conv at the borders; this architecture has none). A class-conditional model's class
  embedding row is added to the time embedding before that map, so one class ``y`` folds into
  the same biases (:func:`export_nir`'s ``y``);
- a spiking neuron becomes ``IF(r=1, v_threshold, v_reset)`` with arrays of the shape of its
  input (per neuron). Our IF starts at ``v_reset`` and charges ``v += x``; NIR's starts at 0.
  IF dynamics are shift-invariant, so the graph holds the shifted neuron: ``v_reset = 0`` and
  threshold ``threshold - v_reset``;
- the firing rule: ours fires at ``v >= threshold``, NIR's reference at ``v > v_threshold``.
  The graph is for NIR's rule: ``v_threshold = nextafter(threshold - v_reset, -inf)`` in the
  graph's dtype, so ``v > v_threshold`` fires exactly when ``v >= threshold`` for a membrane
  computed in that dtype; a tie (``v == threshold``) fires, as in sddpm. A simulator that
  integrates in a wider dtype also fires for v in ``(v_threshold, threshold)``;
- residual adds are fan-in edges; a tensor with several sources that several nodes read (a
  block's output) is a ``Scale`` node with scale 1, tagged ``role = "sum"``;
- the 1x1 shortcut convs act on the real-valued residual tensor (not on spikes): they are
  plain ``Conv2d`` nodes fed by the ``sum`` nodes (``role = "dense"``);
- channel concatenation (decoder skip connections) becomes the consumer split by input
  channels: the res block's first neuron becomes one IF node per part (the neuron is
  elementwise) and its conv and shortcut one conv per part into the same target (the bias on
  the first part);
- nearest x2 upsampling becomes four fixed grouped 0/1 convs (rows to channels, channels to
  2H rows; then the same along the width), tagged ``role = "routing"``: they copy spikes and
  are not synaptic operations;
- the stem's conv on ``x_t`` is a ``Conv2d`` node fed by the input (``role = "dense"``). sddpm
  computes it once per call (the input is the same on every step); a NIR simulator computes it
  on every step with the same result.

Every node carries ``metadata = {"role": ..., "module": <sddpm module name>}`` (IF nodes of a
split neuron also ``channels = [start, stop]``). The graph's metadata records the SNN steps, t,
the firing rule, the sddpm and nir versions and the head.

Read the file back with :func:`read_nir` (``nir.read(path, type_check=False)``): nir 1.0's
Conv2d shape inference takes ``weight.shape[1]`` as the input channels and ``weight.shape[2]``
as both kernel sizes, both wrong for the grouped rectangular routing convs; the graph is
consistent, the inference is not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NIRExportError", "export_nir", "nir_head", "read_nir", "write_nir"]

FORMAT = "sddpm.nir"
ROLES = ("dense", "synaptic", "routing", "sum", "neuron")


class NIRExportError(ValueError):
    """The model (or a setting of it) has no exact NIR graph; the message says why and what to
    do instead."""


def _nir():
    try:
        import nir
    except ImportError as err:  # pragma: no cover - nir is an optional dependency
        raise ImportError(
            "NIR export needs the `nir` package: pip install 'sddpm[nir]' (nir>=1.0,<2)"
        ) from err
    return nir


def check_exportable(model: nn.Module) -> None:
    """Raise :class:`NIRExportError` unless ``model`` is a spiking U-Net with hard-reset IF
    neurons whose reset is not detached (what NIR's ``IF`` expresses)."""
    from ..models import UNet
    from ..snn import SpikingNeuron

    if not isinstance(model, UNet):
        raise NIRExportError(f"NIR export takes an sddpm U-Net, got {type(model).__name__}")
    cfg = model.config
    if cfg.kind != "spiking":
        raise NIRExportError(
            "the ANN twin has no spiking neurons: NIR export is for the spiking U-Net "
            "(config kind='spiking')"
        )
    if getattr(cfg, "tsm", False) or any("tsm" in n for n, _ in model.named_parameters()):
        raise NIRExportError(
            "a TSM model scales every conv's output by a learned factor per SNN step; NIR "
            "nodes are the same on every step, so it has no NIR graph"
        )
    problems = set()
    for name, m in model.named_modules():
        if not isinstance(m, SpikingNeuron):
            continue
        if m.tau is not None:
            problems.add(
                f"LIF neurons (tau={m.tau}, e.g. {name}): only integrate-and-fire is exported"
            )
        if m.reset != "hard":
            problems.add(
                f"soft reset (e.g. {name}): NIR's IF resets to v_reset; a subtractive reset "
                "is not expressible"
            )
        if m.detach_reset:
            problems.add(
                f"detached reset (e.g. {name}): NIR has no gradient path to say the reset "
                "is detached; export a model with neuron.detach_reset=False"
            )
    if problems:
        raise NIRExportError("cannot export to NIR: " + "; ".join(sorted(problems)))


@dataclass
class _Builder:
    """Collects NIR nodes (as constructor arguments) and edges while walking the U-Net."""

    dtype: np.dtype
    nodes: dict[str, Any] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)

    def arr(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu", torch.float64).numpy()
        return np.ascontiguousarray(x, dtype=self.dtype)

    def add(self, name: str, node: Any, sources: list[str]) -> str:
        if name in self.nodes:
            raise AssertionError(f"duplicate NIR node {name}")
        self.nodes[name] = node
        self.edges += [(s, name) for s in sources]
        return name

    def meta(self, role: str, module: str, **extra: Any) -> dict[str, Any]:
        return {"role": role, "module": module, **extra}

    def conv(
        self,
        name: str,
        module: str,
        role: str,
        weight: torch.Tensor | np.ndarray,
        bias: torch.Tensor | np.ndarray | None,
        hw: tuple[int, int],
        sources: list[str],
        stride=(1, 1),
        padding=(0, 0),
        groups: int = 1,
    ) -> str:
        nir = _nir()
        w = self.arr(weight)
        b = self.arr(bias) if bias is not None else np.zeros(w.shape[0], self.dtype)
        node = nir.Conv2d(
            input_shape=tuple(int(v) for v in hw),
            weight=w,
            stride=tuple(int(s) for s in stride),
            padding=tuple(int(p) for p in padding),
            dilation=(1, 1),
            groups=int(groups),
            bias=b,
            metadata=self.meta(role, module),
        )
        return self.add(name, node, sources)

    def neuron(
        self, name: str, module: str, neuron: nn.Module, shape, sources, channels=None
    ) -> str:
        nir = _nir()
        shape = tuple(int(s) for s in shape)
        # Shifted by v_reset (NIR starts at 0); nextafter turns NIR's `>` into our `>=`.
        thr = np.nextafter(self.dtype.type(neuron.threshold - neuron.v_reset), -np.inf)
        extra = {} if channels is None else {"channels": np.array(channels, np.int64)}
        node = nir.IF(
            r=np.ones(shape, self.dtype),
            v_threshold=np.full(shape, thr, self.dtype),
            v_reset=np.zeros(shape, self.dtype),
            metadata=self.meta("neuron", module, **extra),
        )
        return self.add(name, node, sources)

    def junction(self, name: str, module: str, shape, sources: list[str]) -> str:
        """One node holding the sum of ``sources`` (a Scale by 1), or the single source."""
        if len(sources) == 1:
            return sources[0]
        nir = _nir()
        node = nir.Scale(
            scale=np.ones(tuple(int(s) for s in shape), self.dtype),
            metadata=self.meta("sum", module),
        )
        return self.add(name, node, sources)


def _key(module: str) -> str:
    return module.replace(".", "_")


@dataclass
class _Tensor:
    """A real-valued feature map of the U-Net in the graph: the node whose output it is."""

    node: str
    channels: int
    hw: tuple[int, int]


def _routing_weights(channels: int, n: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The two grouped 0/1 kernels of nearest x2 upsampling along one axis of length ``n``
    (``axis`` 0: height, 1: width).

    A (groups = C, kernel n along the axis, no padding) puts output position j of channel c
    into channel ``c*2n + j``: ``A[c*2n + j, 0, j // 2] = 1``. B (groups = C, kernel 2n,
    padding 2n - 1) lays those 2n channels out as positions again: the single input position
    sits at padded index 2n - 1, so output j reads kernel tap 2n - 1 - j: ``B[c, j, 2n-1-j] = 1``.
    """
    a = np.zeros((channels * 2 * n, 1, n), np.float64)
    b = np.zeros((channels, 2 * n, 2 * n), np.float64)
    for c in range(channels):
        for j in range(2 * n):
            a[c * 2 * n + j, 0, j // 2] = 1.0
            b[c, j, 2 * n - 1 - j] = 1.0
    if axis == 0:
        return a[..., None], b[..., None]
    return a[:, :, None, :], b[:, :, None, :]


class _UNetToNIR:
    """Walks a BatchNorm-folded float64 U-Net for one t and emits the graph."""

    def __init__(self, model: nn.Module, temb: torch.Tensor, dtype: np.dtype) -> None:
        self.model = model
        self.temb = temb  # [tdim], swish(time embedding(t)) is applied by the blocks
        self.b = _Builder(dtype)

    def stem(self, name: str, stem: nn.Module, size: int, in_ch: int) -> _Tensor:
        b = self.b
        hw = (size, size)
        b.add("input", _nir().Input(input_type={"input": np.array([in_ch, *hw])}), [])
        c = stem.conv
        x = b.conv(_key(f"{name}.conv"), f"{name}.conv", "dense", c.weight, c.bias, hw,
                   ["input"], c.stride, c.padding)  # fmt: skip
        s = b.neuron(_key(f"{name}.neuron"), f"{name}.neuron", stem.neuron,
                     (c.out_channels, *hw), [x])  # fmt: skip
        c2 = stem.conv2
        out = b.conv(_key(f"{name}.conv2"), f"{name}.conv2", "synaptic", c2.weight, c2.bias,
                     hw, [s], c2.stride, c2.padding)  # fmt: skip
        return _Tensor(out, c2.out_channels, hw)

    def res_block(self, name: str, block: nn.Module, parts: list[_Tensor]) -> _Tensor:
        b, k = self.b, _key(name)
        hw = parts[0].hw
        time = block.time_proj(F.silu(self.temb))  # [out_ch], added after conv1 + BN
        c1, c2 = block.conv1, block.conv2
        bias1 = c1.bias + time
        split = len(parts) > 1
        conv1_nodes, skip_nodes, start = [], [], 0
        for i, p in enumerate(parts):
            sl = slice(start, start + p.channels)
            suffix = f"_part{i}" if split else ""
            s = b.neuron(f"{k}_neuron1{suffix}", f"{name}.neuron1", block.neuron1,
                         (p.channels, *hw), [p.node],
                         channels=[sl.start, sl.stop] if split else None)  # fmt: skip
            conv1_nodes.append(
                b.conv(
                    f"{k}_conv1{suffix}",
                    f"{name}.conv1",
                    "synaptic",
                    c1.weight[:, sl],
                    bias1 if i == 0 else None,
                    hw,
                    [s],
                    c1.stride,
                    c1.padding,
                )  # fmt: skip
            )
            if isinstance(block.skip, nn.Conv2d):
                sk = block.skip
                skip_nodes.append(
                    b.conv(
                        f"{k}_skip{suffix}",
                        f"{name}.skip",
                        "dense",
                        sk.weight[:, sl],
                        sk.bias if i == 0 else None,
                        hw,
                        [p.node],
                    )  # fmt: skip
                )
            else:
                skip_nodes.append(p.node)
            start = sl.stop
        s2 = b.neuron(f"{k}_neuron2", f"{name}.neuron2", block.neuron2,
                      (c1.out_channels, *hw), conv1_nodes)  # fmt: skip
        h = b.conv(f"{k}_conv2", f"{name}.conv2", "synaptic", c2.weight, c2.bias, hw, [s2],
                   c2.stride, c2.padding)  # fmt: skip
        out = b.junction(k, name, (c2.out_channels, *hw), [h, *skip_nodes])
        return _Tensor(out, c2.out_channels, hw)

    def downsample(self, name: str, block: nn.Module, x: _Tensor) -> _Tensor:
        b, k, c = self.b, _key(name), block.conv
        s = b.neuron(f"{k}_neuron", f"{name}.neuron", block.neuron, (x.channels, *x.hw),
                     [x.node])  # fmt: skip
        out = b.conv(f"{k}_conv", f"{name}.conv", "synaptic", c.weight, c.bias, x.hw, [s],
                     c.stride, c.padding)  # fmt: skip
        hw = tuple(
            (n + 2 * p - k) // st + 1
            for n, p, k, st in zip(x.hw, c.padding, c.kernel_size, c.stride, strict=True)
        )
        return _Tensor(out, c.out_channels, hw)

    def upsample(self, name: str, block: nn.Module, x: _Tensor) -> _Tensor:
        b, k, c, ch = self.b, _key(name), block.conv, x.channels
        node = b.neuron(f"{k}_neuron", f"{name}.neuron", block.neuron, (ch, *x.hw), [x.node])
        (h, w) = x.hw
        hw = x.hw
        for axis, n, tag in ((0, h, "rows"), (1, w, "cols")):
            wa, wb = _routing_weights(ch, n, axis)
            pad = (2 * n - 1, 0) if axis == 0 else (0, 2 * n - 1)
            node = b.conv(f"{k}_up_{tag}_a", f"{name}.upsample", "routing", wa, None, hw,
                          [node], groups=ch)  # fmt: skip
            mid = (1, hw[1]) if axis == 0 else (hw[0], 1)
            node = b.conv(f"{k}_up_{tag}_b", f"{name}.upsample", "routing", wb, None, mid,
                          [node], padding=pad, groups=ch)  # fmt: skip
            hw = (2 * h, hw[1]) if axis == 0 else (hw[0], 2 * w)
        out = b.conv(f"{k}_conv", f"{name}.conv", "synaptic", c.weight, c.bias, hw, [node],
                     c.stride, c.padding)  # fmt: skip
        return _Tensor(out, c.out_channels, hw)

    def build(self) -> tuple[dict, list]:
        from ..models.unet import Downsample, ResBlock, Upsample

        m, cfg = self.model, self.model.config
        h = self.stem("stem", m.stem, cfg.image_size, cfg.image_channels)
        skips = [h]
        for i, block in enumerate(m.encoder):
            name = f"encoder.{i}"
            if isinstance(block, ResBlock):
                h = self.res_block(name, block, [h])
            else:
                assert isinstance(block, Downsample)
                h = self.downsample(name, block, h)
            skips.append(h)
        for i, block in enumerate(m.middle):
            h = self.res_block(f"middle.{i}", block, [h])
        for i, block in enumerate(m.decoder):
            name = f"decoder.{i}"
            if isinstance(block, ResBlock):
                h = self.res_block(name, block, [h, skips.pop()])
            else:
                assert isinstance(block, Upsample)
                h = self.upsample(name, block, h)
        nir = _nir()
        self.b.add(
            "output", nir.Output(output_type={"output": np.array([h.channels, *h.hw])}), [h.node]
        )
        return self.b.nodes, self.b.edges


def _head_state(model: nn.Module, dtype: np.dtype) -> dict[str, np.ndarray]:
    # BatchNorm's num_batches_tracked (a 0-d counter, unused in eval mode) is left out
    return {
        k.replace(".", "__"): np.asarray(v.detach().cpu().to(torch.float64).numpy(), dtype)
        for k, v in model.head.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }


def export_nir(model: nn.Module, t: int, *, dtype: str = "float32", y: int | None = None) -> Any:
    """The spiking body of ``model`` (a spiking :class:`~sddpm.models.UNet`) for diffusion step
    ``t`` as a ``nir.NIRGraph`` (see the module docstring for the rewrites).

    ``y``: a class-conditional model's class (``0..num_classes - 1``, or ``num_classes`` for the
    null class), folded into the biases with the time embedding; required for such a model, and
    refused for an unconditional one.

    ``dtype`` (``"float32"`` or ``"float64"``) is the dtype of every array and the one the
    thresholds are made exact for. BatchNorm uses the running statistics (eval mode); the
    neurons' current thresholds are exported (threshold guidance: export inside
    ``override_threshold``). The model is not modified. Raises :class:`NIRExportError` for a
    model NIR cannot express and ``ValueError`` for a bad ``t`` or ``dtype``.
    """
    import sddpm

    from ..models import fold_batchnorm
    from ..models.labels import check_labels, num_classes_of

    check_exportable(model)
    cfg = model.config
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
        raise ValueError(f"t must be an integer diffusion step, got {t!r}")
    if not 0 <= int(t) < cfg.diffusion_steps:
        raise ValueError(f"t must be in [0, {cfg.diffusion_steps - 1}], got {t}")
    n_classes = num_classes_of(model)
    if y is None and n_classes > 0:
        raise ValueError(
            f"this model is class-conditional ({n_classes} classes): give the class to export, "
            f"y in 0..{n_classes - 1} (or {n_classes}, the null class)"
        )
    if y is not None:
        if isinstance(y, bool) or not isinstance(y, (int, np.integer)):
            raise ValueError(f"y must be an integer class, got {y!r}")
        check_labels([int(y)], n_classes)
    nir = _nir()
    np_dtype = np.dtype(dtype)
    # fold_batchnorm works on a copy (eval mode, running statistics); the model is untouched
    folded = fold_batchnorm(model).cpu().to(torch.float64)
    with torch.no_grad():
        temb = folded.time_embed(torch.tensor([int(t)]))[0]
        if y is not None:  # added to the time embedding, as in UNet.forward
            temb = temb + folded.class_embed(torch.tensor([int(y)]))[0]
        nodes, edges = _UNetToNIR(folded, temb, np_dtype).build()
    head = model.head
    metadata = {
        "format": FORMAT,
        "sddpm_version": sddpm.__version__,
        "nir_version": str(getattr(nir, "__version__", "unknown")),
        "t": int(t),
        "snn_steps": int(cfg.snn_timesteps),
        "dtype": dtype,
        "input": "x_t [C, H, W], the same tensor on every SNN step",
        "output": "the tensor entering the head [C', H, W], on every SNN step",
        "firing_rule": (
            "NIR reference: spike when v > v_threshold, then v = v_reset; membranes start at 0"
        ),
        "threshold_rule": (
            "sddpm fires at v >= threshold (ties fire) and starts at v_reset; exported: "
            "v_reset 0 and v_threshold = nextafter(threshold - v_reset, -inf) in dtype, so "
            "`v > v_threshold` fires exactly at v >= threshold, ties included, when the "
            "membrane is computed in dtype"
        ),
        "edges": "edges into one node are summed (residual adds, split concat convs)",
        "roles": (
            "node metadata role: dense (real-valued input: MACs), synaptic (spike input: "
            "accumulates), routing (fixed 0/1 copies of nearest x2 upsampling: no synaptic "
            "work), sum (Scale 1: holds a sum of edges), neuron (IF)"
        ),
        "read_with": "nir.read(path, type_check=False) (nir 1.0 mis-infers grouped convs)",
        "stem_note": "sddpm computes the stem conv once per call; its input never changes",
        "model": {
            "image_channels": int(cfg.image_channels),
            "image_size": int(cfg.image_size),
            "channels": int(cfg.channels),
            "diffusion_steps": int(cfg.diffusion_steps),
            "num_classes": n_classes,
        },
        "head": {
            "in_channels": int(head.conv.in_channels),
            "out_channels": int(head.conv.out_channels),
            "decay": float(head.decay),
            "state": _head_state(model, np_dtype),
            "note": (
                "sddpm.models.unet.Head state_dict (keys with '.' as '__'): BatchNorm, Swish, "
                "3x3 conv, then per step h + swish(bn(conv3x3(h))), then "
                "sum_i decay^(S-1-i) out_i; sddpm.export.nir_head(graph) applies it"
            ),
        },
    }
    if y is not None:  # (HDF5 metadata holds no None)
        metadata["class"] = int(y)
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=metadata, type_check=False)


def nir_head(graph: Any):
    """The head that finishes a graph made by :func:`export_nir`: a function
    ``h_seq [S, B, C', H, W] (tensor or array, the graph's output over its SNN steps) -> eps
    [B, C, H, W]`` (a float64 tensor), so that ``nir_head(g)(run(g, x_t)) == model(x_t, t)``.
    It reads only the graph's metadata."""
    from ..models.unet import Head

    meta = graph.metadata
    if meta.get("format") != FORMAT or "head" not in meta:
        raise ValueError(f"not an sddpm NIR graph (metadata format {meta.get('format')!r})")
    h = meta["head"]
    head = Head(int(h["in_channels"]), int(h["out_channels"]), float(h["decay"]))
    state = {k.replace("__", "."): torch.as_tensor(np.asarray(v)) for k, v in h["state"].items()}
    missing, unexpected = head.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise ValueError(
            f"the graph's head state does not fit: missing {missing}, extra {unexpected}"
        )
    head = head.to(torch.float64).eval()

    def finish(h_seq) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(h_seq) if not isinstance(h_seq, torch.Tensor) else h_seq)
        if x.dim() != 5 or x.shape[2] != head.conv.in_channels:
            raise ValueError(
                f"expected h_seq [S, B, {head.conv.in_channels}, H, W], got {tuple(x.shape)}"
            )
        with torch.no_grad():
            return head(x.to(torch.float64))

    return finish


def write_nir(path: str | os.PathLike, graph: Any) -> None:
    """``nir.write`` to ``path``, atomically (nothing half written)."""
    from ..io import atomic_path

    with atomic_path(path) as tmp:
        _nir().write(tmp, graph)


def read_nir(path: str | os.PathLike) -> Any:
    """``nir.read(path, type_check=False)``: see the module docstring for why."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such NIR file")
    return _nir().read(path, type_check=False)
