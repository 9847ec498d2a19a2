"""Noise schedules, the training objective and samplers (one algorithm per module).

Every sampler calls any ``model(x_t [B,C,H,W] float32, t [B] int64) -> eps`` (or ``v``);
:func:`sample` is the entry point.
"""

from .analytic import (
    ANALYTIC_VARIANTS,
    analytic_sample,
    estimate_eps_moments,
    load_moments,
    save_moments,
)
from .ddim import ddim_sample, ddim_step
from .ddpm import ddpm_sample, ddpm_step_mean_logvar
from .dpm_solver import dpm_solver_pp_step, dpm_solver_sample
from .guidance import (
    GuidedModel,
    check_guidance,
    cycle_labels,
    drop_labels,
    label_dropout_generator,
    label_dropout_uniforms,
)
from .loss import (
    PREDICTIONS,
    draw_t_and_noise,
    loss_map,
    output_to_eps,
    output_to_x0,
    q_sample,
    training_loss,
    v_target,
)
from .options import DEFAULT_GUIDANCE, EXECUTION_FIELDS, OptionError, SamplingOptions
from .sample import DEFAULT_SPACING, DEFAULT_STEPS, SAMPLERS, sample
from .schedule import SCHEDULE_KINDS, SPACINGS, NoiseSchedule, timesteps
from .seeding import PerImageRandn, image_seed, initial_noise

__all__ = [
    "ANALYTIC_VARIANTS",
    "DEFAULT_SPACING",
    "DEFAULT_STEPS",
    "EXECUTION_FIELDS",
    "GuidedModel",
    "NoiseSchedule",
    "OptionError",
    "PREDICTIONS",
    "PerImageRandn",
    "SAMPLERS",
    "SCHEDULE_KINDS",
    "SPACINGS",
    "SamplingOptions",
    "analytic_sample",
    "DEFAULT_GUIDANCE",
    "check_guidance",
    "cycle_labels",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step_mean_logvar",
    "dpm_solver_pp_step",
    "dpm_solver_sample",
    "draw_t_and_noise",
    "drop_labels",
    "estimate_eps_moments",
    "image_seed",
    "initial_noise",
    "label_dropout_generator",
    "label_dropout_uniforms",
    "load_moments",
    "loss_map",
    "output_to_eps",
    "output_to_x0",
    "q_sample",
    "sample",
    "save_moments",
    "timesteps",
    "training_loss",
    "v_target",
]
