"""Per-image random streams: an image depends on (seed, its global index), nothing else.

Each image ``i`` gets its own ``torch.Generator`` seeded from ``SeedSequence([seed, i, stream])``
(stream 0: the initial noise ``x_T``; stream 1: the noise a stochastic sampler adds), so an
image does not change with the batch size, the batch it lands in or the number of processes
sharing the work (as in EDM's per-image seeds). The streams are drawn on the target device, so
the same seed gives different (equally valid) images on a CPU and on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

INITIAL_NOISE_STREAM = 0
SAMPLER_NOISE_STREAM = 1


def _as_indices(num_or_indices: int | Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(num_or_indices, int):
        if num_or_indices < 0:
            raise ValueError(f"number of images must be >= 0, got {num_or_indices}")
        return list(range(num_or_indices))
    indices = [int(i) for i in torch.as_tensor(num_or_indices).flatten().tolist()]
    if any(i < 0 for i in indices):
        raise ValueError(f"image indices must be >= 0, got {indices}")
    return indices


def image_seed(seed: int, index: int, stream: int) -> int:
    """A 63-bit seed for image ``index`` of run ``seed`` (``seed``, ``index`` >= 0)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    state = np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(
        1, np.uint64
    )
    return int(state[0]) >> 1


class PerImageRandn:
    """``randn_like(x)`` for a batch whose row ``b`` is image ``indices[b]``.

    Each call draws the next ``x.shape[1:]`` normals of every image's own generator.
    """

    def __init__(
        self,
        indices: Sequence[int],
        seed: int,
        stream: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.generators = []
        for i in indices:
            g = torch.Generator(device=self.device)
            g.manual_seed(image_seed(seed, i, stream))
            self.generators.append(g)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[len(indices), *shape]`` standard normals, one image per generator."""
        if not self.generators:
            return torch.empty((0, *shape), dtype=dtype, device=self.device)
        return torch.stack(
            [
                torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype)
                for g in self.generators
            ]
        )

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Normals shaped like ``x`` ``[B, ...]`` (B must equal the number of images)."""
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} but {len(self.generators)} image generators")
        return self.randn(x.shape[1:], dtype=x.dtype).to(x.device)


def initial_noise(
    num_or_indices: int | Sequence[int] | torch.Tensor,
    shape: Sequence[int],
    seed: int = 0,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``x_T`` ``[N, *shape]`` ~ N(0, I) for images ``range(N)`` or the given global indices.

    ``shape`` is one image's shape, e.g. ``(C, H, W)``. Image ``i`` is the same whatever other
    indices are drawn with it.
    """
    indices = _as_indices(num_or_indices)
    return PerImageRandn(indices, seed, INITIAL_NOISE_STREAM, device).randn(tuple(shape), dtype)
