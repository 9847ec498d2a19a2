"""A small feature network for the 8x8 scikit-learn digits: proxy FID and sample quality.

The digits dataset is the project's seconds-scale test bed; the FID Inception network means
nothing on 8x8 grey digits. This module trains (deterministically, in about a second on a CPU) a
small MLP classifier on scikit-learn's digits *training* split and uses it two ways:

- its penultimate activations (128-d) are the features of a **proxy FID** between two sets of
  digit images (:func:`digits_proxy_fid`);
- its class probabilities give a sample-quality report (:func:`digits_sample_report`): the
  fraction of images classified with confidence above 0.9 and how many of the 10 classes occur.

**A proxy FID is not an FID.** Its numbers depend on this network and its training, are on a
different scale, and are NOT comparable to published FIDs (which use the FID Inception on
CIFAR-10 and similar); use them only to compare runs with each other.

Input convention: ``[N, 1, H, W]`` float images in **[0, 1]** (white digit strokes are high
values, as in scikit-learn's data divided by 16). Images other than 8x8 are area-averaged to
8x8 (exact for 16x16 or 32x32 nearest-upsampled digits), so samples of a model trained on
upsampled digits can be scored directly.

The split is fixed: ``train_test_split(images, labels, test_size=0.25, random_state=0)`` of
``sklearn.datasets.load_digits()`` (1347 train, 450 test images). Trained weights are cached in
``$SDDPM_CACHE_DIR`` (default ``~/.cache/sddpm``) and retrained when missing or stale.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..io import atomic_path
from .metrics import fid_from_features

__all__ = [
    "DigitsFeatureNet",
    "DigitsSplit",
    "DigitsTrainingRecipe",
    "default_cache_dir",
    "digits_proxy_fid",
    "digits_sample_report",
    "load_digits_feature_net",
    "load_digits_split",
    "train_digits_feature_net",
]

CACHE_ENV = "SDDPM_CACHE_DIR"
FEATURE_DIM = 128
NUM_CLASSES = 10


class DigitsSplit(NamedTuple):
    """The fixed digits split. Images ``[N, 1, 8, 8]`` float32 in [0, 1]; labels ``[N]`` int64."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits_split(test_size: float = 0.25, random_state: int = 0) -> DigitsSplit:
    """scikit-learn's digits, split with ``train_test_split(test_size=0.25, random_state=0)``.

    (Unrelated to :mod:`sddpm.data`'s digits dataset, which trains diffusion models on all 1797.)
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0)[:, None]  # 0..16 -> [0, 1]
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=random_state)
    return DigitsSplit(
        *(torch.from_numpy(np.ascontiguousarray(a)) for a in (x_tr, y_tr, x_te, y_te))
    )


class DigitsOutput(NamedTuple):
    features: Tensor
    """``[N, 128]`` penultimate activations (proxy FID features)."""
    logits: Tensor
    """``[N, 10]`` class logits."""


class DigitsFeatureNet(nn.Module):
    """MLP 64 -> 256 -> 128 -> 10 with ReLU; input ``[N, 1, H, W]`` images in [0, 1].

    ``forward`` returns :class:`DigitsOutput`; ``test_accuracy`` holds its accuracy on the
    held-out split once :func:`load_digits_feature_net` or :func:`train_digits_feature_net` made it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, 256)
        self.feature = nn.Linear(256, FEATURE_DIM)
        self.classifier = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.test_accuracy: float | None = None

    def forward(self, images: Tensor) -> DigitsOutput:
        x = _to_8x8(images).flatten(1) * 2 - 1  # the MLP sees [-1, 1]
        h = F.relu(self.feature(F.relu(self.hidden(x))))
        return DigitsOutput(features=h, logits=self.classifier(h))

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 4096) -> Tensor:
        """``[N, 1, H, W]`` images in [0, 1] -> ``[N, 128]`` features."""
        return torch.cat([self(b).features for b in images.split(batch_size)])

    @torch.no_grad()
    def probs(self, images: Tensor, batch_size: int = 4096) -> Tensor:
        """``[N, 1, H, W]`` images in [0, 1] -> ``[N, 10]`` class probabilities."""
        return torch.cat([self(b).logits.softmax(dim=1) for b in images.split(batch_size)])


def _to_8x8(images: Tensor) -> Tensor:
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected grey images [N, 1, H, W], got shape {tuple(images.shape)}")
    if images.numel() > 0:
        lo, hi = float(images.min()), float(images.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"expected images in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
                "map samples in [-1, 1] with (x + 1) / 2 and clamp to [0, 1]"
            )
    images = images.float()
    h, w = images.shape[-2:]
    if (h, w) == (8, 8):
        return images
    if h % 8 == 0 and w % 8 == 0:
        return F.adaptive_avg_pool2d(images, 8)
    return F.interpolate(images, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)


@dataclass(frozen=True)
class DigitsTrainingRecipe:
    """Everything that determines the trained weights (stored with the cache, checked on load)."""

    version: int = 1
    seed: int = 0
    steps: int = 200
    lr: float = 5e-3
    weight_decay: float = 1e-4
    noise_std: float = 0.05  # Gaussian pixel noise augmentation, so near-digits still classify
    test_size: float = 0.25
    split_seed: int = 0


def train_digits_feature_net(recipe: DigitsTrainingRecipe | None = None) -> DigitsFeatureNet:
    """Train the network on the digits training split (full batch, Adam), deterministically.

    Randomness (initialisation, augmentation noise) comes from one ``torch.Generator`` seeded
    with ``recipe.seed``; global RNG state is neither used nor changed. Returns it in eval mode
    with ``test_accuracy`` set.
    """
    recipe = recipe or DigitsTrainingRecipe()
    split = load_digits_split(recipe.test_size, recipe.split_seed)
    g = torch.Generator().manual_seed(recipe.seed)
    net = DigitsFeatureNet()
    with torch.no_grad():
        for layer in (net.hidden, net.feature, net.classifier):
            bound = (6.0 / (layer.in_features + layer.out_features)) ** 0.5
            layer.weight.copy_(torch.rand(layer.weight.shape, generator=g) * 2 * bound - bound)
            layer.bias.zero_()
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.steps)
    x, y = split.x_train, split.y_train
    net.train()
    # One thread: these matmuls are tiny, so more threads only add contention (20x slower on
    # busy shared cores) and make float summation order depend on the machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(recipe.steps):
            noisy = (x + recipe.noise_std * torch.randn(x.shape, generator=g)).clamp(0, 1)
            loss = F.cross_entropy(net(noisy).logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    net.eval().requires_grad_(False)
    net.test_accuracy = _accuracy(net, split.x_test, split.y_test)
    return net


def _accuracy(net: DigitsFeatureNet, x: Tensor, y: Tensor) -> float:
    return float((net.probs(x).argmax(dim=1) == y).float().mean())


def default_cache_dir() -> Path:
    """``$SDDPM_CACHE_DIR``, else ``$XDG_CACHE_HOME/sddpm``, else ``~/.cache/sddpm``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sddpm"


def load_digits_feature_net(
    cache_dir: str | os.PathLike | None = None,
    *,
    retrain: bool = False,
    recipe: DigitsTrainingRecipe | None = None,
) -> DigitsFeatureNet:
    """The trained digits network (eval mode, ``test_accuracy`` set), from cache or trained now.

    The cache file ``digits-features-v{version}.safetensors`` in ``cache_dir`` (default
    :func:`default_cache_dir`) is used if its stored recipe equals ``recipe``; otherwise the
    network is trained and the file written atomically. An unwritable cache only warns.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    recipe = recipe or DigitsTrainingRecipe()
    recipe_json = json.dumps(asdict(recipe), sort_keys=True)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    file = cache / f"digits-features-v{recipe.version}.safetensors"
    if file.is_file() and not retrain:
        try:
            with safe_open(str(file), "pt") as f:
                stored = (f.metadata() or {}).get("recipe")
            if stored == recipe_json:
                net = DigitsFeatureNet()
                net.load_state_dict(load_file(str(file)), strict=True)
                net.eval().requires_grad_(False)
                split = load_digits_split(recipe.test_size, recipe.split_seed)
                net.test_accuracy = _accuracy(net, split.x_test, split.y_test)
                return net
        except Exception as err:  # corrupt or foreign file: retrain and overwrite it
            warnings.warn(f"ignoring unreadable digits feature cache {file}: {err}", stacklevel=2)
    net = train_digits_feature_net(recipe)
    try:
        tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
        with atomic_path(file) as tmp:
            save_file(tensors, str(tmp), metadata={"recipe": recipe_json})
    except OSError as err:
        warnings.warn(f"could not cache the digits feature network in {cache}: {err}", stacklevel=2)
    return net


def digits_proxy_fid(
    images1: Tensor, images2: Tensor, net: DigitsFeatureNet | None = None
) -> float:
    """Proxy FID between two sets of ``[N, 1, H, W]`` digit images in [0, 1] (N >= 2 each).

    Frechet distance of the network's 128-d features. NOT comparable to published FIDs: use it
    only to compare digits runs scored with the same network.
    """
    net = net or load_digits_feature_net()
    return fid_from_features(net.features(images1), net.features(images2))


def digits_sample_report(
    images: Tensor, net: DigitsFeatureNet | None = None, *, confidence: float = 0.9
) -> dict:
    """Quality of ``[N, 1, H, W]`` digit samples in [0, 1] as the classifier sees them.

    Returns a JSON-ready dict: ``num_images``; ``confident_fraction`` (images whose top class
    probability exceeds ``confidence``); ``class_coverage`` (fraction of the 10 classes that are
    the predicted class of at least one confident image); ``class_counts`` (confident images per
    class); ``mean_max_prob``; ``classifier_test_accuracy``.
    """
    net = net or load_digits_feature_net()
    if images.shape[0] == 0:
        raise ValueError("digits_sample_report got no images")
    p = net.probs(images)
    top, cls = p.max(dim=1)
    confident = top > confidence
    counts = torch.bincount(cls[confident], minlength=NUM_CLASSES)
    return {
        "num_images": int(images.shape[0]),
        "confidence": confidence,
        "confident_fraction": float(confident.float().mean()),
        "class_coverage": float((counts > 0).float().mean()),
        "class_counts": [int(c) for c in counts],
        "mean_max_prob": float(top.mean()),
        "classifier_test_accuracy": net.test_accuracy,
    }
