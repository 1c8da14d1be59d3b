"""Shared pieces of the diffusers-parity tests: the SD 1.5 scheduler config and a fake denoiser
computed identically in PyTorch and in JAX."""

import jax.numpy as jnp
import torch

# stable-diffusion-v1-5/scheduler/scheduler_config.json (a PNDM config; it has no timestep_spacing).
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def fake_model_torch(x, t):
  """Mostly-linear in x (so latents stay O(1) like with a real denoiser), nonlinear in x and t."""
  return 0.9 * x + 0.1 * torch.sin(torch.as_tensor(t).float() / 100 + x)


def fake_model_jax(x, t):
  return 0.9 * x + 0.1 * jnp.sin(jnp.asarray(t, jnp.float32) / 100 + x)
