"""Spiking neurons (IF, LIF; hard and soft reset) and surrogate gradients."""

from .fused import KERNELS, NeuronKernelError, multistep_neuron
from .layers import SpikeConv2d
from .neuron import RESET_MODES, SpikingNeuron, neuron_step, set_neuron_kernel
from .surrogate import Surrogate, atan_grad, heaviside, rectangular_grad, sigmoid_grad
from .threshold import (
    get_thresholds,
    override_threshold,
    reset_neurons,
    restore_thresholds,
    set_threshold,
    spiking_neurons,
)

__all__ = [
    "KERNELS",
    "NeuronKernelError",
    "RESET_MODES",
    "SpikeConv2d",
    "SpikingNeuron",
    "Surrogate",
    "atan_grad",
    "get_thresholds",
    "heaviside",
    "multistep_neuron",
    "neuron_step",
    "override_threshold",
    "rectangular_grad",
    "reset_neurons",
    "restore_thresholds",
    "set_neuron_kernel",
    "set_threshold",
    "sigmoid_grad",
    "spiking_neurons",
]
