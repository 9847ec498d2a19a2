"""An exponential moving average of a model's weights *and* BatchNorm statistics.

After every optimiser update, for every floating-point entry of the model's ``state_dict``
(trainable parameters and BatchNorm ``running_mean`` / ``running_var``)::

    ema = decay * ema + (1 - decay) * current

Integer buffers (BatchNorm ``num_batches_tracked``) and frozen parameters (the sinusoidal
time-embedding table) are copied, not averaged. The published trainer (pytorch-ddpm's ``ema``)
averages every ``state_dict`` entry the same way, so the EMA model's BatchNorm statistics belong
to the averaged weights rather than to the last batch.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copy of ``model.state_dict()`` updated with :meth:`update`.

    Args:
        model: the (unwrapped: no DDP, no ``torch.compile``) model whose state is tracked.
        decay: in [0, 1]; 0 copies the model at every update, 1 never changes.

    ``state_dict()`` returns the averaged tensors under the model's own keys, so it can be
    loaded into the same architecture (or saved as ``ema.safetensors``).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        self.shadow: dict[str, torch.Tensor] = {}
        self._averaged: dict[str, bool] = {}
        for name, value in model.state_dict().items():
            self.shadow[name] = value.detach().clone()
            self._averaged[name] = value.is_floating_point() and name not in frozen

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``shadow = decay * shadow + (1 - decay) * model`` (copy for integer/frozen entries)."""
        d = self.decay
        current = model.state_dict()
        averaged = [k for k, avg in self._averaged.items() if avg]
        copied = [k for k, avg in self._averaged.items() if not avg]
        if averaged:
            ema = [self.shadow[k] for k in averaged]
            new = [current[k].detach() for k in averaged]
            torch._foreach_mul_(ema, d)
            torch._foreach_add_(ema, new, alpha=1.0 - d)
        for k in copied:
            self.shadow[k].copy_(current[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged state (tensors shared with this object: clone before modifying)."""
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the shadow values (same keys and shapes as the model's state_dict)."""
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(
                f"EMA state does not fit the model: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}"
            )
        with torch.no_grad():
            for k, v in state.items():
                if tuple(v.shape) != tuple(self.shadow[k].shape):
                    raise ValueError(
                        f"EMA entry {k} has shape {tuple(v.shape)}, the model "
                        f"{tuple(self.shadow[k].shape)}"
                    )
                self.shadow[k].copy_(v)

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged state into ``model`` (same architecture)."""
        model.load_state_dict(self.shadow)
