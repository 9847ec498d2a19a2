"""The FID Inception network: the TensorFlow-ported InceptionV3 that FID and IS numbers use.

Published FID and IS numbers (SDDPM, DDPM, and most diffusion papers) are computed with the
TensorFlow "inception-2015-12-05" graph. pytorch-fid ported it to PyTorch (weights file
``pt_inception-2015-12-05-6726825d.pth``); the SDDPM evaluation code uses that port and adds a
softmax head for the Inception Score. This module is our own implementation of the same network,
written without torchvision, with exactly the parameter names and shapes of that weights file, so
the real file loads strictly and the features are the published ones.

Where the TF graph differs from torchvision's InceptionV3 (and we follow the graph):

- every BatchNorm has ``eps=0.001`` and every conv is bias-free;
- the average pools inside the A, C and first E blocks ignore padded zeros
  (``count_include_pad=False``), as TensorFlow's average pool does;
- the last E block (``Mixed_7c``) pools its side branch with a 3x3 *max* pool, not an average pool;
- the classifier has 1008 outputs, and the Inception Score head is ``softmax(fc.weight @ pool)``
  without ``fc.bias``: the published code sets ``fc.bias = None`` although the file holds it.

Weights are never bundled; :func:`load_fid_inception` finds or downloads them (see there).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..io import state_dict_mismatch

__all__ = [
    "INCEPTION_WEIGHTS_ENV",
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_URL",
    "FIDInceptionV3",
    "InceptionOutput",
    "check_state_dict",
    "load_fid_inception",
    "resolve_inception_weights",
    "rule_made_weights",
]

INCEPTION_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_ENV = "SDDPM_INCEPTION_WEIGHTS"
# torch.hub checks that the file's sha256 starts with this (the suffix of the file name).
_WEIGHTS_HASH_PREFIX = "6726825d"

INPUT_SIZE = 299
POOL_DIM = 2048
NUM_CLASSES = 1008


class InceptionOutput(NamedTuple):
    """What :class:`FIDInceptionV3` returns for a batch of N images."""

    pool: Tensor
    """``[N, 2048]`` average-pool features (the FID and KID features)."""
    prob: Tensor
    """``[N, 1008]`` class probabilities ``softmax(fc.weight @ pool)`` (the IS input)."""


class _ConvBN(nn.Module):
    """Bias-free conv, BatchNorm (eps 0.001, TF's value), ReLU. Keys: ``conv.*``, ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: Tensor) -> Tensor:
    # TensorFlow's "SAME" average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):
    """Mixed_5b/5c/5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1. Out: 224 + pool_features."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([a, b, c, d], dim=1)


class _BlockB(nn.Module):
    """Mixed_6a, the 35 -> 17 grid reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], dim=1)


class _BlockC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 convolutions (1x7 and 7x1). Out: 768."""

    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        row, col = (1, 7), (7, 1)
        prow, pcol = (0, 3), (3, 0)
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, row, padding=prow)
        self.branch7x7_3 = _ConvBN(c7, 192, col, padding=pcol)
        self.branch7x7dbl_1 = _ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, col, padding=pcol)
        self.branch7x7dbl_3 = _ConvBN(c7, c7, row, padding=prow)
        self.branch7x7dbl_4 = _ConvBN(c7, c7, col, padding=pcol)
        self.branch7x7dbl_5 = _ConvBN(c7, 192, row, padding=prow)
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            c = conv(c)
        c = self.branch7x7dbl_5(c)
        d = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([a, b, c, d], dim=1)


class _BlockD(nn.Module):
    """Mixed_7a, the 17 -> 8 grid reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b = conv(b)
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], dim=1)


class _BlockE(nn.Module):
    """Mixed_7b/7c: expanded 1x3 / 3x1 branches. Out: 2048.

    ``pool="avg"`` for Mixed_7b (TF average pool); ``pool="max"`` for Mixed_7c, where the TF graph
    uses a 3x3 max pool (pytorch-fid's FIDInceptionE_2 reproduces the same quirk).
    """

    def __init__(self, cin: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], dim=1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], dim=1)
        if self.pool == "avg":
            d = _avg_pool_tf(x)
        else:
            d = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        d = self.branch_pool(d)
        return torch.cat([a, b, c, d], dim=1)


class FIDInceptionV3(nn.Module):
    """The FID InceptionV3 (TF graph ``inception-2015-12-05``), randomly initialised.

    Use :func:`load_fid_inception` to get it with the real weights, in eval mode.

    Input: ``[N, 3, H, W]`` (or ``[N, 1, H, W]``, repeated to 3 channels as the published code
    does) float images with values in ``[0, 1]``, any H and W. The network resizes them to
    299x299 (bilinear, ``align_corners=False``) and scales them to ``[-1, 1]``.

    Output: :class:`InceptionOutput` with ``pool`` ``[N, 2048]`` and ``prob`` ``[N, 1008]``.

    On CUDA, PyTorch lets cuDNN run float32 convolutions in TF32 by default, which moves the
    features by ~1e-3 relative (and FID by a few hundredths); set
    ``torch.backends.cudnn.allow_tf32 = False`` for full float32, as on the CPU.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _BlockA(192, pool_features=32)
        self.Mixed_5c = _BlockA(256, pool_features=64)
        self.Mixed_5d = _BlockA(288, pool_features=64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, c7=128)
        self.Mixed_6c = _BlockC(768, c7=160)
        self.Mixed_6d = _BlockC(768, c7=160)
        self.Mixed_6e = _BlockC(768, c7=192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, pool="avg")
        self.Mixed_7c = _BlockE(2048, pool="max")
        # fc.bias exists so that the real weights file loads strictly; forward() ignores it.
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)

    def pool_features(self, images: Tensor) -> Tensor:
        """``[N, C, H, W]`` images in [0, 1] -> ``[N, 2048]`` average-pool features."""
        x = _prepare_images(images)
        x = self.Conv2d_1a_3x3(x)
        x = self.Conv2d_2a_3x3(x)
        x = self.Conv2d_2b_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_3b_1x1(x)
        x = self.Conv2d_4a_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return x.mean(dim=(2, 3))

    def class_probabilities(self, pool: Tensor) -> Tensor:
        """``[N, 2048]`` pool features -> ``[N, 1008]`` softmax(fc.weight @ pool), no bias."""
        # The published IS code sets fc.bias = None before the softmax; we match it. (Dropout
        # before fc is the identity in eval mode, the only mode metrics use.)
        return torch.softmax(F.linear(pool, self.fc.weight), dim=1)

    def forward(self, images: Tensor) -> InceptionOutput:
        pool = self.pool_features(images)
        return InceptionOutput(pool=pool, prob=self.class_probabilities(pool))


def _prepare_images(images: Tensor) -> Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"expected images of shape [N, 3, H, W] or [N, 1, H, W], got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise TypeError(
            f"expected float images in [0, 1], got dtype {images.dtype}; "
            "convert uint8 images with images.float() / 255"
        )
    if images.numel() > 0:
        lo, hi = images.aminmax()
        lo, hi = float(lo), float(hi)
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"expected images in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
                "map samples in [-1, 1] with (x + 1) / 2 and clamp to [0, 1]"
            )
    if images.shape[1] == 1:
        # Repeated before resizing, as the published code does: resizing one channel and
        # copying it can differ in the last bit (the kernels vectorise over channels).
        images = images.expand(-1, 3, -1, -1)
    x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


def check_state_dict(
    state_dict: Mapping[str, Tensor],
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    *,
    source: str = "state_dict",
    show: int = 5,
) -> None:
    """Raise ``ValueError`` unless ``state_dict`` has exactly the keys and shapes of ``expected``.

    The message lists the first ``show`` missing, unexpected and mis-shaped keys of each kind.
    """
    problem = state_dict_mismatch(expected, state_dict, show)
    if problem:
        raise ValueError(
            f"{source} does not match the FID InceptionV3 ({INCEPTION_WEIGHTS_FILENAME}): {problem}"
        )


def resolve_inception_weights(
    path: str | os.PathLike | None = None, *, download: bool = True
) -> Path:
    """Find the FID Inception weights file and return its :class:`~pathlib.Path`.

    Order: ``path`` if given; else the environment variable ``SDDPM_INCEPTION_WEIGHTS``; else the
    torch hub cache ``torch.hub.get_dir()/checkpoints/pt_inception-2015-12-05-6726825d.pth``
    (where pytorch-fid and torchvision put it too); else, if ``download``, it is downloaded
    there from :data:`INCEPTION_WEIGHTS_URL` (sha256 prefix checked). A path that is given
    (argument or environment variable) but missing is an error, never silently replaced.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"FID Inception weights not found at {p} (the path given)")
        return p
    env = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(
                f"FID Inception weights not found at {p}, the path in ${INCEPTION_WEIGHTS_ENV}; "
                f"point it at a copy of {INCEPTION_WEIGHTS_FILENAME} or unset it"
            )
        return p
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    target = cache_dir / INCEPTION_WEIGHTS_FILENAME
    if target.is_file():
        return target
    help_text = (
        f"Download {INCEPTION_WEIGHTS_URL} on a machine with internet access and either put it "
        f"at {target} or set {INCEPTION_WEIGHTS_ENV}=/path/to/{INCEPTION_WEIGHTS_FILENAME} "
        "(or pass the path explicitly)."
    )
    if not download:
        raise FileNotFoundError(f"FID Inception weights not found at {target}. {help_text}")
    # Folders we create, deepest first, so that a failed download leaves nothing behind.
    created = [d for d in (cache_dir, *cache_dir.parents) if not d.exists()]
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # download_url_to_file writes to a temporary file and renames it only when complete.
        torch.hub.download_url_to_file(
            INCEPTION_WEIGHTS_URL, str(target), hash_prefix=_WEIGHTS_HASH_PREFIX, progress=True
        )
    except Exception as err:  # offline, HTTP error, bad hash: all end the same way
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
        raise FileNotFoundError(
            f"FID Inception weights not found at {target} and the download failed "
            f"({type(err).__name__}: {err}). {help_text}"
        ) from err
    return target


def load_fid_inception(
    path: str | os.PathLike | None = None,
    *,
    device: torch.device | str = "cpu",
    download: bool = True,
) -> FIDInceptionV3:
    """The FID InceptionV3 with the real weights, in eval mode, gradients off, on ``device``.

    ``path`` is resolved by :func:`resolve_inception_weights`. The file is read with
    ``torch.load(weights_only=True)`` and must have exactly the published keys and shapes.
    """
    file = resolve_inception_weights(path, download=download)
    state_dict = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{file} holds a {type(state_dict).__name__}, expected a state_dict")
    model = FIDInceptionV3()
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(state_dict, expected, source=str(file))
    model.load_state_dict(state_dict, strict=True)
    model.eval().requires_grad_(False)
    return model.to(device)


def rule_made_weights(keys_and_shapes: Mapping[str, list[int]]) -> dict[str, Tensor]:
    """Deterministic stand-in weights for the FID Inception, made by the rule recorded in the
    reference vectors (``tests/data/fid-inception.safetensors``, metadata ``rule``) from the
    real file's key list: one generator seeded 0, drawing in sorted-key order. They let the
    network be checked (against the published code's outputs, or on a GPU against the CPU)
    where the real weights cannot be downloaded."""
    g = torch.Generator().manual_seed(0)
    weights: dict[str, Tensor] = {}
    for key in sorted(keys_and_shapes):
        shape = list(keys_and_shapes[key])
        if key.endswith("num_batches_tracked"):
            weights[key] = torch.tensor(0, dtype=torch.long)
        elif key == "fc.bias":
            weights[key] = torch.zeros(shape)
        elif key.endswith(".weight") and len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            scale = 10 / math.sqrt(fan_in) if key == "fc.weight" else math.sqrt(2 / fan_in)
            weights[key] = torch.randn(shape, generator=g) * scale
        elif key.endswith("bn.weight"):
            weights[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("bn.bias"):
            weights[key] = 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("running_mean"):
            weights[key] = 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("running_var"):
            weights[key] = 1 + 0.1 * torch.rand(shape, generator=g)
        else:
            raise KeyError(f"the weight rule has no case for {key!r}")
    return weights
