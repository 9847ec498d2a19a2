"""The small U-Net configurations the tests build (importable from every test: ``tests/`` is on
pytest's ``pythonpath``)."""

from __future__ import annotations

from sddpm.models import UNetConfig

TINY = {"image_channels": 1, "image_size": 8, "channels": 8, "channel_mult": (1, 2),
        "num_res_blocks": 1}  # fmt: skip
"""Gray 8x8 images, 8 channels, two levels of one residual block each: every kind of block
of the U-Net in a model that runs in milliseconds."""


def tiny_unet_config(**changes) -> UNetConfig:
    """:data:`TINY`, with ``changes`` (any :class:`UNetConfig` field) over it."""
    return UNetConfig(**{**TINY, **changes})
