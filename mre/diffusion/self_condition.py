"""Self-conditioning (Chen, Zhang and Hinton, "Analog Bits", 2022): the denoiser also reads an
earlier x0 estimate of its own.

In training, half of the steps (`train.self_condition_prob`) first run the network without an
estimate (zeros), take its x0 estimate with the gradient stopped, and train the second call, which
reads that estimate, against the usual target; the other half train the call with zeros. In
sampling, every step hands the network the x0 estimate of the step before (zeros at the first).
The second call learns to refine its own first guess: where a denoiser's posterior mean is soft
(an object's border, decided at mid noise), it can commit to one side instead of averaging, which
is what Analog Bits found decisive for data made of a few discrete values, as the toy world's
flat colours are. Only the U-Net's input changes (`mre_self_condition` in its config, one more
group of latent channels); the forward process, targets and samplers are the usual ones.

With guidance, each branch (full, image-only, unconditional, reward-unconditional) is its own
chain: it reads the x0 estimate of its own previous call, so the unconditional branches stay
unconditional.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mre.diffusion.schedule import NoiseSchedule, resolve_prediction_type
from mre.diffusion.source_skip import signal_and_noise_scale


def self_conditioned(unet) -> bool:
  """Whether the U-Net reads an x0 estimate (`mre_self_condition` in its config)."""
  return bool(getattr(getattr(unet, "config", None), "self_condition", False))


def predicted_x0(schedule: NoiseSchedule, noisy, output, timesteps, prediction_type=None):
  """The x0 estimate a model output makes from x_t = sqrt(ab) x0 + sqrt(1 - ab) eps (the form in
  which training and every sampler hand the U-Net its input; fractional Euler timesteps take the
  interpolated sigma, as the samplers' input scaling does)."""
  prediction_type = resolve_prediction_type(schedule, prediction_type)
  signal, noise_scale = signal_and_noise_scale(schedule, timesteps, noisy.shape[0])
  shape = (noisy.shape[0],) + (1,) * (noisy.ndim - 1)
  signal = signal.reshape(shape).astype(output.dtype)
  noise_scale = noise_scale.reshape(shape).astype(output.dtype)
  noisy = noisy.astype(output.dtype)
  if prediction_type == "sample":
    return output
  if prediction_type == "epsilon":
    return (noisy - noise_scale * output) / signal
  return signal * noisy - noise_scale * output  # v_prediction


def training_estimate(denoise, schedule: NoiseSchedule, sample, noisy, t, context, key, prob, **kw):
  """The x0 estimate a self-conditioned training step feeds its second call: the first call's
  (with zeros), gradient stopped, for a `prob` share of the examples; zeros for the rest."""
  first = denoise(sample, t, context, **kw)
  estimate = jax.lax.stop_gradient(predicted_x0(schedule, noisy, first.astype(jnp.float32), t))
  use = jax.random.bernoulli(key, prob, (noisy.shape[0],))
  use = use.reshape((-1,) + (1,) * (noisy.ndim - 1))
  return jnp.where(use, estimate, 0.0).astype(noisy.dtype)


__all__ = ["predicted_x0", "self_conditioned", "training_estimate"]
