"""Instruction editing in latent space: initial noise -> sampler loop with dual guidance -> latents.

This is the denoising half of StableDiffusionInstructPix2PixPipeline (encoding the prompt and image
and decoding the result are the caller's): `edit_latents` is a pure function usable under any
transform, `make_edit_sampler` wraps it in one jitted computation.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from mre.diffusion.guidance import dual_guidance, guidance_branches
from mre.diffusion.samplers import init_noise_sigma, sample
from mre.diffusion.schedule import NoiseSchedule
from mre.diffusion.self_condition import predicted_x0, self_conditioned
from mre.diffusion.source_skip import denoiser


def edit_latents(
    unet: Callable[..., jax.Array],
    image_latents: jax.Array,
    text_emb: jax.Array,
    uncond_text_emb: jax.Array,
    schedule: NoiseSchedule,
    *,
    num_steps: int = 30,
    sampler: str = "euler_ancestral",
    key: Optional[jax.Array] = None,
    noise: Optional[jax.Array] = None,
    step_noise: Optional[jax.Array] = None,
    text_scale: float = 7.5,
    image_scale: float = 1.5,
    extra_cond: Optional[Mapping[str, Any]] = None,
    extra_cond_uncond: Optional[Mapping[str, Any]] = None,
    reward_scale: Optional[float] = None,
    prediction_type: Optional[str] = None,
    eta: float = 0.0,
    channel_axis: int = -1,
    latent_channels: Optional[int] = None,
) -> jax.Array:
  """Edited latents (before VAE decoding) for a batch of B images.

  Args:
    unet: `unet(sample, timesteps, context, **extra_cond) -> output`; sample has the noisy latents
      and the image latents concatenated on `channel_axis` (NHWC by default).
    image_latents: VAE posterior mode of the original images, NOT scaled by the VAE scaling
      factor (as the diffusers pipeline and InstructPix2Pix training use them), [B, h, w, 4].
    text_emb, uncond_text_emb: CLIP contexts of the instruction and of the empty prompt.
    key: split into the initial-noise key and the per-step-noise key.
    noise: unit-variance initial noise (shape of the latents); drawn from `key` when omitted. Like
      the pipeline's `latents=` argument, it is multiplied by the sampler's `init_noise_sigma`.
    step_noise: optional pre-drawn per-step noise [num_steps, *latents.shape] for the stochastic
      samplers (tests use it to match diffusers draw for draw).
    Guidance settings (text_scale, image_scale, extra_cond, extra_cond_uncond, reward_scale) are
    those of `dual_guidance`; sampler settings those of `samplers.sample`.
  """
  key_init = key_steps = None
  if key is not None:
    key_init, key_steps = jax.random.split(key)
  if noise is None:
    if key_init is None:
      raise ValueError("key: needed to draw the initial noise when `noise` is not given")
    shape = list(image_latents.shape)
    if latent_channels is not None:
      shape[channel_axis] = latent_channels
    noise = jax.random.normal(key_init, tuple(shape), image_latents.dtype)
  latents = noise * init_noise_sigma(schedule, num_steps, sampler).astype(noise.dtype)
  model_fn = denoiser(unet, schedule, prediction_type, channel_axis, call=_stateless(unet))
  guidance = functools.partial(
      dual_guidance,
      model_fn,
      image_latents=image_latents,
      text_emb=text_emb,
      uncond_text_emb=uncond_text_emb,
      text_scale=text_scale,
      image_scale=image_scale,
      extra_cond=extra_cond,
      extra_cond_uncond=extra_cond_uncond,
      reward_scale=reward_scale,
      channel_axis=channel_axis,
  )

  state = None
  if not self_conditioned(unet):

    def guided_unet(latents_input, t):
      return guidance(latents_input, t=t)

  else:
    # Each guidance branch reads its own previous x0 estimate (mre/diffusion/self_condition.py).
    copies = guidance_branches(text_scale, image_scale, reward_scale)
    state = jnp.zeros((copies * latents.shape[0],) + latents.shape[1:], latents.dtype)

    def guided_unet(latents_input, t, estimates):
      guided, output = guidance(latents_input, t=t, self_cond=estimates)
      rows = jnp.concatenate([latents_input] * copies, axis=0)
      t_rows = t if jnp.ndim(t) == 0 else jnp.concatenate([t] * copies)
      estimates = predicted_x0(schedule, rows, output, t_rows, prediction_type)
      return guided, estimates.astype(latents.dtype)

  return sample(
      guided_unet,
      latents,
      schedule,
      num_steps,
      key_steps,
      sampler=sampler,
      prediction_type=prediction_type,
      eta=eta,
      noise=step_noise,
      state=state,
  )


def _stateless(unet):
  """An NNX module called inside the compiled loop must not mutate itself across trace levels
  (flax raises TraceContextError), so each call runs on a fresh `nnx.merge` of its state: reads
  see the current weights, writes (RNG counters, statistics) stay local to the sampling run."""
  if not isinstance(unet, nnx.Module):
    return unet
  graphdef, state = nnx.split(unet)
  return lambda *args, **kwargs: nnx.merge(graphdef, state)(*args, **kwargs)


def make_edit_sampler(
    schedule: NoiseSchedule,
    num_steps: int = 30,
    sampler: str = "euler_ancestral",
    **settings: Any,
) -> Callable[..., jax.Array]:
  """A compiled editor with fixed settings (`settings`: the keyword settings of `edit_latents`,
  e.g. text_scale, image_scale, reward_scale, eta, channel_axis). Returns

    edit(unet, image_latents, text_emb, uncond_text_emb, *, key=None, noise=None,
         step_noise=None, extra_cond=None, extra_cond_uncond=None) -> latents

  where `unet` is an `nnx.Module` (its state is a traced argument, so new weights do not
  recompile) or a plain function (a static argument). The whole run is one XLA computation,
  compiled once per input shape.
  """

  def run(
      unet,
      schedule,
      image_latents,
      text_emb,
      uncond_text_emb,
      key,
      noise,
      step_noise,
      extra_cond,
      extra_cond_uncond,
  ):
    return edit_latents(
        unet,
        image_latents,
        text_emb,
        uncond_text_emb,
        schedule,
        num_steps=num_steps,
        sampler=sampler,
        key=key,
        noise=noise,
        step_noise=step_noise,
        extra_cond=extra_cond,
        extra_cond_uncond=extra_cond_uncond,
        **settings,
    )

  run_module = nnx.jit(run)
  run_function = jax.jit(run, static_argnums=0)

  def edit(
      unet,
      image_latents,
      text_emb,
      uncond_text_emb,
      *,
      key=None,
      noise=None,
      step_noise=None,
      extra_cond=None,
      extra_cond_uncond=None,
  ):
    runner = run_module if isinstance(unet, nnx.Module) else run_function
    return runner(
        unet,
        schedule,
        image_latents,
        text_emb,
        uncond_text_emb,
        key,
        noise,
        step_noise,
        extra_cond,
        extra_cond_uncond,
    )

  return edit
