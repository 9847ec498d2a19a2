"""sddpm: Spiking Denoising Diffusion Probabilistic Models.

Subpackages, in the direction data flows (none imports the CLI):

- :mod:`sddpm.snn`: spiking neurons and surrogate gradients;
- :mod:`sddpm.models`: the spiking U-Net, its ANN twin, presets, checkpoints;
- :mod:`sddpm.compat`: published SDDPM checkpoints to and from our format;
- :mod:`sddpm.diffusion`: schedules, the training objective, samplers;
- :mod:`sddpm.data`, :mod:`sddpm.training`, :mod:`sddpm.evaluation`.
"""

__version__ = "0.1.0"
