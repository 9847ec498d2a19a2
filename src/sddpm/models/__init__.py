"""The spiking U-Net, its ANN twin, presets and the checkpoint format."""

from .checkpoint import find_model_dir, load_pretrained, read_config, save_pretrained
from .config import NeuronConfig, UNetConfig
from .inference import fold_batchnorm
from .labels import check_labels
from .memory_format import MEMORY_FORMATS, memory_format_name, set_memory_format
from .presets import PRESETS, preset
from .tsm import tsm_scale_layers
from .unet import ANNUNet, SpikingUNet, UNet, build_model, count_parameters

__all__ = [
    "ANNUNet",
    "MEMORY_FORMATS",
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
    "memory_format_name",
    "preset",
    "save_pretrained",
    "set_memory_format",
    "tsm_scale_layers",
]
