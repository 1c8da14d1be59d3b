"""The source skip: an InstructPix2Pix denoiser parameterised relative to the source image.

An editor's output equals its input almost everywhere. A plain InstructPix2Pix U-Net has to learn
that copy: at every noise level it rebuilds, from the noisy latents and the concatenated source,
the part of the image the instruction does not touch, and every error of that copy shows in the
edit as noise or a shifted colour. With the source skip the network sees the noisy latents with
the (noised) source taken out, `x_t - sqrt(alpha_bar_t) * x_src`, and its output is shifted back:

  v_prediction:  v = F - sqrt(1 - alpha_bar_t) * x_src
  epsilon:       eps = F
  sample:        x0 = F + x_src

so an unchanged pixel is the network's easiest answer (the edit residual x0 - x_src is zero
there). This is only a reparameterisation: the forward process, the training target, the loss and
every sampler are those of InstructPix2Pix, and F is trained on exactly the target it would
predict if the edit residual x0 - x_src were diffused. Where the source is dropped (conditioning
dropout, the unconditional branches of guidance) x_src is zero and the skip does nothing.

It needs the source in the same units as the noisy latents: pixel space (the toy editors), or a
latent space whose scaling factor is 1. Measured in the toy world: README, "The paper's claim in
the toy world".
"""

from __future__ import annotations

from typing import Callable, Optional

import jax.numpy as jnp

from mre.diffusion.schedule import NoiseSchedule, check_prediction_type, resolve_prediction_type


def signal_and_noise_scale(schedule: NoiseSchedule, timesteps, batch: int):
  """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) per example [B]; fractional timesteps (Euler
  sampling) take the sigma interpolated linearly in t, the rule by which those samplers scale
  their model input, so the skip removes exactly the source the input carries."""
  t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (batch,))
  ab = schedule.alphas_cumprod.astype(jnp.float32)
  sigmas = jnp.sqrt((1.0 - ab) / ab)
  sigma = jnp.interp(t, jnp.arange(ab.shape[0], dtype=jnp.float32), sigmas)
  exact = ab[jnp.clip(t, 0, ab.shape[0] - 1).astype(jnp.int32)]
  alpha_bar = jnp.where(t == jnp.floor(t), exact, 1.0 / (1.0 + sigma**2))  # integers: exact
  return jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)


def with_source_skip(
    unet: Callable,
    schedule: NoiseSchedule,
    prediction_type: str,
    channel_axis: int = -1,
    sigma_data: float = 0.0,
    affine: bool = False,
) -> Callable:
  """`unet(sample, timesteps, context, **kw)` reparameterised by the source skip; `sample` is the
  noisy latents and the source latents concatenated on `channel_axis` (InstructPix2Pix's input).

  sigma_data > 0 (x0 prediction only) adds EDM's preconditioning on the edit residual: with
  r_t = (x_t - sqrt(ab) x_src) / sqrt(ab), the residual plus noise of level sigma =
  sqrt(1 - ab) / sqrt(ab),

    x0 = x_src + c_skip r_t + c_out F,  c_skip = sd^2 / (sigma^2 + sd^2),
                                         c_out = sigma sd / sqrt(sigma^2 + sd^2)

  so at low noise the output follows the noisy input and F only corrects the noise (its error
  shrinks with sigma); without it the network has to learn to pass x_t through itself.

  affine (x0 prediction only): the U-Net gives c + c^2 channels, a shift F and a c x c matrix M
  per pixel, and x0 = x_src + F + M x_src. A conv net learns sharp outputs slowly (in the toy
  world an edited object kept a soft halo); a smooth M applied to the sharp source recolours an
  object up to its exact edge, since within a few pixels of it the source holds only the object's
  and its surroundings' colours, which one affine colour map can send anywhere. F adds what the
  source does not hold (an added shape). M = 0 is the plain source skip.
  """
  check_prediction_type(prediction_type)  # the skip covers every type the schedule knows
  if affine and (prediction_type != "sample" or sigma_data):
    raise ValueError(
        "the affine source skip needs x0 prediction (prediction_type 'sample') without "
        f"source_skip_sigma_data, not {prediction_type!r} / {sigma_data}"
    )
  if sigma_data and prediction_type != "sample":
    raise ValueError(
        f"source_skip_sigma_data needs x0 prediction (prediction_type 'sample'), not "
        f"{prediction_type!r}"
    )

  def denoise(sample, timesteps, context, **kwargs):
    noisy, source = jnp.split(sample, 2, axis=channel_axis)
    signal, noise_scale = signal_and_noise_scale(schedule, timesteps, sample.shape[0])
    shape = [1] * sample.ndim
    shape[0] = sample.shape[0]
    signal = signal.reshape(shape).astype(sample.dtype)
    noise_scale = noise_scale.reshape(shape)
    residual_noisy = noisy - signal * source  # sqrt(ab) (x0 - x_src) + sqrt(1 - ab) eps
    shifted = jnp.concatenate([residual_noisy, source], axis=channel_axis)
    if kwargs.get("self_cond") is not None:  # an x0 estimate: handed over as its edit residual
      kwargs = dict(
          kwargs, self_cond=kwargs["self_cond"] - source.astype(kwargs["self_cond"].dtype)
      )
    out = unet(shifted, timesteps, context, **kwargs)
    source = source.astype(out.dtype)
    if prediction_type == "v_prediction":
      return out - noise_scale.astype(out.dtype) * source
    if prediction_type == "sample" and sigma_data:
      signal = signal.astype(out.dtype)
      sigma = noise_scale.astype(out.dtype) / signal
      residual = residual_noisy.astype(out.dtype) / signal  # r_t, in x0 units
      c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
      c_out = sigma * sigma_data / jnp.sqrt(sigma**2 + sigma_data**2)
      return source + c_skip * residual + c_out * out
    if prediction_type == "sample" and affine:
      return _affine_skip(out, source, channel_axis)
    if prediction_type == "sample":
      return out + source
    return out

  return denoise


def _affine_skip(out, source, channel_axis: int):
  """x_src + F + M x_src from the U-Net's output [F | M] (c + c^2 channels on channel_axis)."""
  out, source = jnp.moveaxis(out, channel_axis, -1), jnp.moveaxis(source, channel_axis, -1)
  c = source.shape[-1]
  if out.shape[-1] != c + c * c:
    raise ValueError(
        f"the affine source skip needs {c + c * c} output channels ({c} shift + {c}x{c} matrix) "
        f"for {c} image channels; the U-Net gives {out.shape[-1]}"
    )
  shift, matrix = out[..., :c], out[..., c:].reshape(out.shape[:-1] + (c, c))
  x0 = source + shift + jnp.einsum("...ij,...j->...i", matrix, source)
  return jnp.moveaxis(x0, -1, channel_axis)


def denoiser(
    unet,
    schedule: NoiseSchedule,
    prediction_type: Optional[str] = None,
    channel_axis: int = -1,
    call: Optional[Callable] = None,
):
  """The U-Net as the samplers and the loss call it (`call`, default the U-Net itself): with the
  source skip when the U-Net's config asks for one (`mre_source_skip` in its config.json).
  `prediction_type` defaults to the schedule's."""
  call = unet if call is None else call
  config = getattr(unet, "config", None)
  if getattr(config, "source_skip", False):
    prediction_type = resolve_prediction_type(schedule, prediction_type)
    sigma_data = getattr(config, "source_skip_sigma_data", 0.0)
    affine = getattr(config, "source_skip_affine", False)
    return with_source_skip(call, schedule, prediction_type, channel_axis, sigma_data, affine)
  return call


__all__ = ["denoiser", "signal_and_noise_scale", "with_source_skip"]
