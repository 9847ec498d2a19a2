"""The spiking U-Net, its ANN twin, presets and the checkpoint format."""

from .checkpoint import find_model_dir, load_pretrained, read_config, save_pretrained
from .config import NeuronConfig, UNetConfig
from .inference import fold_batchnorm
from .labels import check_labels
from .presets import PRESETS, preset
from .tsm import tsm_scale_layers
from .unet import ANNUNet, SpikingUNet, UNet, build_model, count_parameters

__all__ = [
    "ANNUNet",
    "NeuronConfig",
    "PRESETS",
    "SpikingUNet",
    "UNet",
    "UNetConfig",
    "build_model",
    "check_labels",
    "count_parameters",
    "find_model_dir",
    "fold_batchnorm",
    "read_config",
    "load_pretrained",
    "preset",
    "save_pretrained",
    "tsm_scale_layers",
]
