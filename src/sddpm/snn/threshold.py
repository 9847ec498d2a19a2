"""Model-wide neuron settings: the paper's threshold guidance and state resets."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .neuron import SpikingNeuron


def spiking_neurons(model: nn.Module) -> list[SpikingNeuron]:
    """Every :class:`SpikingNeuron` in ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, SpikingNeuron)]


def _require_neurons(model: nn.Module) -> list[SpikingNeuron]:
    neurons = spiking_neurons(model)
    if not neurons:
        raise ValueError(
            f"{type(model).__name__} has no spiking neurons: threshold guidance needs a spiking "
            "model (an ANN twin has no thresholds to move)"
        )
    return neurons


def get_thresholds(model: nn.Module) -> list[float]:
    """The threshold of every spiking neuron in ``model``, in module order."""
    return [n.threshold for n in spiking_neurons(model)]


def set_threshold(model: nn.Module, value: float) -> list[float]:
    """Set every spiking neuron's threshold to ``value``; returns the previous thresholds.

    This is the paper's threshold guidance (Cao et al. 2024, Sec. 3.3): moving the global
    firing threshold at sampling time, without retraining.
    """
    value = float(value)
    if not value > 0:
        raise ValueError(f"threshold must be > 0, got {value}")
    neurons = _require_neurons(model)
    previous = [n.threshold for n in neurons]
    for n in neurons:
        n.threshold = value
    return previous


def restore_thresholds(model: nn.Module, thresholds: list[float]) -> None:
    """Put back thresholds returned by :func:`set_threshold` or :func:`get_thresholds`."""
    neurons = spiking_neurons(model)
    if len(neurons) != len(thresholds):
        raise ValueError(
            f"model has {len(neurons)} spiking neurons but {len(thresholds)} thresholds were given"
        )
    for n, th in zip(neurons, thresholds, strict=True):
        n.threshold = th


@contextmanager
def override_threshold(model: nn.Module, value: float) -> Iterator[nn.Module]:
    """Every spiking neuron's threshold is ``value`` inside the block, restored on exit.

    The old thresholds come back also when the block raises.
    """
    previous = set_threshold(model, value)
    try:
        yield model
    finally:
        restore_thresholds(model, previous)


def reset_neurons(model: nn.Module) -> None:
    """Forget every neuron's inspected membrane state (calls start from rest regardless)."""
    for n in spiking_neurons(model):
        n.reset_state()
