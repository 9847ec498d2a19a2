"""Model presets: the paper's architectures per dataset, and a small one for a CPU."""

from __future__ import annotations

from .config import UNetConfig

PRESETS: dict[str, UNetConfig] = {
    # Published CIFAR-10 model: 66,696,413 parameters.
    "cifar10": UNetConfig(image_channels=3, image_size=32),
    # Published defaults (ch 128, ch_mult [1,2,2,4], 2 res blocks) at 64x64.
    "celeba64": UNetConfig(image_channels=3, image_size=64),
    # The paper resizes MNIST and Fashion-MNIST to 32x32, one channel.
    "mnist": UNetConfig(image_channels=1, image_size=32),
    "fashion-mnist": UNetConfig(image_channels=1, image_size=32),
    # scikit-learn's 8x8 digits: trains on a 2-core CPU in minutes (16 channels gave samples
    # as recognisable as 32 for 40% of the time; see benchmarks/README.md).
    "digits": UNetConfig(
        image_channels=1, image_size=8, channels=16, channel_mult=(1, 2), num_res_blocks=1
    ),
}


def preset(name: str, kind: str = "spiking") -> UNetConfig:
    """The config of preset ``name`` (``kind="ann"`` for its ANN twin)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(kind=kind)
