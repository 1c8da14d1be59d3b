"""Diffusion core: noise schedule and training targets, samplers, dual classifier-free guidance,
and the training-time condition dropout that guidance needs."""

from mre.diffusion.condition_dropout import conditioning_dropout, drop_rewards
from mre.diffusion.editing import edit_latents, make_edit_sampler
from mre.diffusion.guidance import dual_guidance, guidance_enabled
from mre.diffusion.samplers import (
    SAMPLERS,
    ddim_step,
    dpmpp_2m_step,
    euler_ancestral_step,
    euler_step,
    init_noise_sigma,
    sample,
    sampling_sigmas,
    sampling_timesteps,
    timestep_spacing,
)
from mre.diffusion.schedule import (
    NoiseSchedule,
    add_noise,
    make_schedule,
    min_snr_weight,
    schedule_from_config,
    snr,
    training_target,
    velocity,
)

__all__ = [
    "SAMPLERS",
    "NoiseSchedule",
    "add_noise",
    "conditioning_dropout",
    "ddim_step",
    "dpmpp_2m_step",
    "drop_rewards",
    "dual_guidance",
    "edit_latents",
    "euler_ancestral_step",
    "euler_step",
    "guidance_enabled",
    "init_noise_sigma",
    "make_edit_sampler",
    "make_schedule",
    "min_snr_weight",
    "sample",
    "sampling_sigmas",
    "sampling_timesteps",
    "schedule_from_config",
    "snr",
    "timestep_spacing",
    "training_target",
    "velocity",
]
