"""Published SDDPM and SDM checkpoints to and from our models.

The published ``Spk_UNet`` (github.com/AndyCao1125/SDDPM) keeps its blocks in flat lists with
names of its own; ours name what each part is. The renaming is a fixed table of prefix rules,
applied in either direction, so :func:`from_published` and :func:`to_published` are exact
inverses.

SDM's ``Spk_UNet_TSM`` (github.com/AndyCao1125/SDM, ``TSM.py``) has the same layout with every
conv but ``T_output_layer`` wrapped in a ``TSMConv2d``: its weights under ``X.tsmconv.weight``
/ ``X.tsmconv.bias`` and its per-step scales under ``X.tsmp`` (shape ``[S, 1, 1, 1, 1]``); ours
are ``X'.weight``, ``X'.bias`` and ``X'.step_scale`` (shape ``[S]``), ``X'`` our name of ``X``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from .io import PickledObjectsError, load_torch_file, state_dict_mismatch
from .models.config import UNetConfig
from .models.unet import UNet, build_model

# (our name pattern, published name pattern); {i} is a block index.
_RULES: list[tuple[str, str]] = [
    ("time_embed.table", "time_embedding.timembedding.0.weight"),
    ("time_embed.proj_in.", "time_embedding.timembedding.1."),
    ("time_embed.proj_out.", "time_embedding.timembedding.3."),
    ("stem.conv.", "conv."),
    ("stem.bn.", "bn."),
    ("stem.conv2.", "conv_identity."),
    ("stem.bn2.", "bn_identity."),
    ("encoder.{i}.", "downblocks.{i}."),
    ("middle.{i}.", "middleblocks.{i}."),
    ("decoder.{i}.", "upblocks.{i}."),
    ("head.bn.", "tail_bn."),
    ("head.conv.", "tail_conv."),
    ("head.temporal_conv.", "T_output_layer."),
    ("head.temporal_bn.", "last_bn."),
]
# Inside a res block.
_BLOCK_RULES: list[tuple[str, str]] = [("time_proj.", "temb_proj.1."), ("skip.", "shortcut.")]


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(re.escape("{i}"), r"(\d+)"))


_OURS = [(_compile(a), b) for a, b in _RULES]
_THEIRS = [(_compile(b), a) for a, b in _RULES]


def _rename(name: str, rules, block_rules: list[tuple[str, str]]) -> str:
    for pattern, target in rules:
        m = pattern.match(name)
        if not m:
            continue
        head = target.replace("{i}", m.group(1)) if m.groups() else target
        rest = name[m.end() :]
        if m.groups():  # inside a block: rename the block's own parts
            for src, dst in block_rules:
                if rest.startswith(src):
                    rest = dst + rest[len(src) :]
                    break
        return head + rest
    raise KeyError(name)


_SCALE = "step_scale"  # our TSM scale, after the conv's name
_TSM_CONV, _TSM_SCALE = "tsmconv.", "tsmp"  # SDM's: "X.tsmconv.weight", "X.tsmp"


def published_name(ours: str, tsm: bool = False) -> str:
    """Our parameter/buffer name -> the published ``Spk_UNet`` name, or with ``tsm=True`` (for
    the weight and bias of a TSM conv) the SDM ``Spk_UNet_TSM`` name. A TSM scale
    (``X.step_scale``) always maps to SDM's ``X.tsmp``."""
    try:
        if ours.endswith("." + _SCALE):
            conv = _rename(ours.removesuffix(_SCALE) + "weight", _OURS, _BLOCK_RULES)
            return conv.removesuffix("weight") + _TSM_SCALE
        name = _rename(ours, _OURS, _BLOCK_RULES)
    except KeyError:
        raise KeyError(f"{ours!r} is not a name of an sddpm U-Net") from None
    if tsm:
        prefix, _, leaf = name.rpartition(".")
        return f"{prefix}.{_TSM_CONV}{leaf}"
    return name


def our_name(published: str) -> str:
    """A published ``Spk_UNet`` (SDDPM) or ``Spk_UNet_TSM`` (SDM) name -> ours."""
    name = published.replace("." + _TSM_CONV, ".")
    if name.endswith("." + _TSM_SCALE):
        name = name.removesuffix(_TSM_SCALE) + "weight"
        scale = True
    else:
        scale = False
    try:
        ours = _rename(name, _THEIRS, [(b, a) for a, b in _BLOCK_RULES])
    except KeyError:
        raise KeyError(f"{published!r} is not a name of the published Spk_UNet") from None
    return ours.removesuffix("weight") + _SCALE if scale else ours


def _tsm_convs(names) -> set[str]:
    """Prefixes ``X.`` of our TSM convs: those with an ``X.step_scale`` among ``names``."""
    return {k.removesuffix(_SCALE) for k in names if k.endswith("." + _SCALE)}


def to_published(state: Mapping[str, Any]) -> dict[str, Any]:
    """Map any ``name -> value`` mapping of ours (parameters, gradients, buffers) to published
    names, keeping the values. A TSM model (it has ``*.step_scale`` entries) maps to SDM's
    ``Spk_UNet_TSM`` names, its scales (tensors ``[S]``) viewed as SDM's ``[S, 1, 1, 1, 1]``."""
    tsm = _tsm_convs(state)
    out = {}
    for k, v in state.items():
        name = published_name(k, tsm=k.rpartition(".")[0] + "." in tsm)
        if k.endswith("." + _SCALE) and isinstance(v, torch.Tensor):
            v = v.reshape(-1, 1, 1, 1, 1)
        out[name] = v
    return out


def _from_published_values(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published name -> value to ours (SDM's ``[S, 1, 1, 1, 1]`` scales become ``[S]``)."""
    return {
        our_name(k): v.reshape(-1) if k.endswith("." + _TSM_SCALE) else v for k, v in state.items()
    }


def config_from_published(config: Mapping[str, Any], image_size: int = 32) -> UNetConfig:
    """Our config from the published ``Spk_UNet`` arguments (``T``, ``ch``, ``ch_mult``,
    ``attn``, ``num_res_blocks``, ``dropout``, ``timestep``, ``img_ch``)."""
    required = ["T", "ch", "ch_mult", "num_res_blocks", "timestep"]
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"published config lacks {missing}; it needs {required} (+ img_ch)")
    if config.get("attn"):
        raise ValueError(
            f"attn={config['attn']}: the published SDDPM models have no attention; "
            "a checkpoint with attention levels is not supported"
        )
    return UNetConfig(
        image_channels=int(config.get("img_ch", 3)),
        image_size=int(config.get("img_size", image_size)),
        channels=int(config["ch"]),
        channel_mult=tuple(int(m) for m in config["ch_mult"]),
        num_res_blocks=int(config["num_res_blocks"]),
        snn_timesteps=int(config["timestep"]),
        diffusion_steps=int(config["T"]),
    )


def from_published(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | UNetConfig,
    image_size: int = 32,
) -> UNet:
    """A published state_dict (``net_model`` or ``ema_model`` entry) -> our spiking U-Net.

    ``config`` holds the published ``Spk_UNet`` arguments (or is a :class:`UNetConfig`). A
    ``module.`` prefix (DataParallel) is stripped. An SDM ``Spk_UNet_TSM`` state_dict (it has
    ``*.tsmp`` keys) gives a TSM model (``tsm=True``), a plain one ``tsm=False``, whatever
    ``config`` says. Missing, unexpected or mis-shaped keys raise ``ValueError`` listing the
    first few of each. Returned in eval mode.
    """
    cfg = config if isinstance(config, UNetConfig) else config_from_published(config, image_size)
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    tsm = any(k.endswith("." + _TSM_SCALE) for k in state)
    cfg = cfg.replace(tsm=tsm)
    model = build_model(cfg)
    expected = {k: v.shape for k, v in to_published(model.state_dict()).items()}
    problem = state_dict_mismatch(expected, state)
    if problem:
        kind = "SDM Spk_UNet_TSM" if tsm else "published Spk_UNet"
        raise ValueError(f"the checkpoint does not fit the {kind} {cfg}: {problem}")
    model.load_state_dict(_from_published_values(state))
    return model.eval()


def load_published_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a published ``.pt`` checkpoint safely (``torch.load(weights_only=True)``).

    A truncated or garbage file is reported as unreadable (:class:`sddpm.io.UnreadableFileError`);
    only an intact file of pickled Python objects is told to be re-saved as plain tensors."""
    try:
        obj = load_torch_file(path)
    except PickledObjectsError as err:
        raise ValueError(
            f"{err}. Re-save it from a trusted environment as a dict of state_dicts "
            "(torch.save({'net_model': model.state_dict()}, path))."
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def published_state_dict(checkpoint: Mapping[str, Any], entry: str = "net_model") -> dict:
    """The state_dict of one entry of a published checkpoint (``net_model`` or ``ema_model``);
    a bare state_dict is accepted as is."""
    if entry in checkpoint:
        return dict(checkpoint[entry])
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint)
    entries = [k for k, v in checkpoint.items() if isinstance(v, Mapping)]
    raise ValueError(f"checkpoint has no {entry!r} entry; its state_dict entries: {entries}")
