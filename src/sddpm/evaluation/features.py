"""The networks that turn images into features (FID, KID) and class probabilities (IS).

:class:`FeatureNetwork` wraps the FID Inception (:meth:`FeatureNetwork.inception`), the digits
proxy classifier (:meth:`FeatureNetwork.digits`), or any module shaped like one. Features are
always computed in full float32: :func:`no_tf32` turns TensorFlow-float-32 matmuls and
convolutions off while the network runs (on Ampere and newer GPUs they are on by default for
cuDNN, and would make GPU FIDs differ from CPU ones), and evaluation records say so
(:data:`FEATURE_PRECISION`).

The digits network gives a **proxy** FID / IS / KID: useful to compare digits runs with each
other, NOT comparable to published FIDs (which use the FID Inception); results say so
(:data:`PROXY_NOTE`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "FEATURE_DIMS",
    "FEATURE_NETWORKS",
    "FEATURE_PRECISION",
    "PROXY_NOTE",
    "FeatureNetwork",
    "no_tf32",
]

FEATURE_NETWORKS = ("inception", "digits")
# Feature sizes, known without loading a network, so a wrong stats file fails fast.
FEATURE_DIMS = {"inception": 2048, "digits": 128}
PROXY_NOTE = (
    "proxy metrics from the digits classifier: NOT comparable to published FIDs / IS (which use "
    "the FID Inception); compare them only with other runs scored by the same network"
)
# What every evaluation record says about how its features were computed.
FEATURE_PRECISION = {"feature_dtype": "float32", "feature_tf32": False}


@contextmanager
def no_tf32() -> Iterator[None]:
    """TF32 off for CUDA matmuls and cuDNN convolutions inside the block; the previous
    settings are restored afterwards (also on error)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


@dataclass(frozen=True)
class FeatureNetwork:
    """A network mapping ``[N, C, H, W]`` images in [0, 1] to ``([N, dim] features,
    [N, num_classes] probabilities)``.

    ``module`` returns either an object with ``pool`` and ``prob`` (the FID Inception's
    :class:`~sddpm.evaluation.inception.InceptionOutput`) or one with ``features`` and ``logits``
    (:class:`~sddpm.evaluation.digits_features.DigitsFeatureNet`). ``proxy`` marks networks whose
    numbers are not comparable to published ones.
    """

    name: str
    module: nn.Module
    dim: int
    num_classes: int
    proxy: bool = False

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``[N, C, H, W]`` images in [0, 1] -> ``(features [N, dim], probs [N, classes])``,
        computed in full float32 (TF32 off, see :func:`no_tf32`)."""
        with no_tf32():
            out = self.module(images.to(self.device))
        if hasattr(out, "pool"):
            return out.pool, out.prob
        return out.features, out.logits.softmax(dim=1)

    @classmethod
    def inception(
        cls,
        model: nn.Module | None = None,
        *,
        weights: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        download: bool = True,
    ) -> FeatureNetwork:
        """The FID Inception (``model`` as given, e.g. a test double, else
        :func:`~sddpm.evaluation.inception.load_fid_inception` with ``weights``)."""
        if model is None:
            from .inception import load_fid_inception

            model = load_fid_inception(weights, device=device, download=download)
        fc = getattr(model, "fc", None)
        if not isinstance(fc, nn.Linear):
            raise ValueError("an Inception-like feature network needs an `fc` Linear layer")
        return cls("inception", model.eval(), fc.in_features, fc.out_features, proxy=False)

    @classmethod
    def digits(
        cls,
        net: nn.Module | None = None,
        *,
        device: str | torch.device = "cpu",
        cache_dir: str | os.PathLike | None = None,
    ) -> FeatureNetwork:
        """The digits proxy classifier (``net`` as given, else
        :func:`~sddpm.evaluation.digits_features.load_digits_feature_net`)."""
        if net is None:
            from .digits_features import load_digits_feature_net

            net = load_digits_feature_net(cache_dir)
        net = net.to(device).eval()
        return cls("digits", net, net.feature.out_features, net.classifier.out_features, True)

    @classmethod
    def load(
        cls,
        name: str,
        *,
        inception_weights: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
    ) -> FeatureNetwork:
        """``"inception"`` or ``"digits"``."""
        if name == "inception":
            return cls.inception(weights=inception_weights, device=device)
        if name == "digits":
            return cls.digits(device=device)
        raise ValueError(f"unknown feature network {name!r}; choose one of {FEATURE_NETWORKS}")

    def check_images(self, channels: int) -> None:
        """Refuse images this network cannot take (the digits net reads grey images only)."""
        if self.name == "digits" and channels != 1:
            raise ValueError(
                f"the digits feature network takes 1-channel images; these have {channels} "
                "channels: use the FID Inception features for them"
            )
