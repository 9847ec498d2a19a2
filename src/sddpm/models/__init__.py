"""The spiking U-Net, its ANN twin, presets and the checkpoint format."""

from .checkpoint import load_pretrained, save_pretrained
from .config import NeuronConfig, UNetConfig
from .presets import PRESETS, preset
from .unet import ANNUNet, SpikingUNet, UNet, build_model, count_parameters

__all__ = [
    "ANNUNet",
    "NeuronConfig",
    "PRESETS",
    "SpikingUNet",
    "UNet",
    "UNetConfig",
    "build_model",
    "count_parameters",
    "load_pretrained",
    "preset",
    "save_pretrained",
]
