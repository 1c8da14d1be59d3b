"""Rollout training: a share of the training inputs is made the way the sampler makes them, from
the network's own estimate one sampling step earlier, so that the network learns to correct it.

A denoiser is trained on x_t built from the true x0, but a sampler hands it x_t built from its own
estimate at the step before. In the toy world that estimate keeps a soft halo around an edited
object, and the low-noise steps, never trained on such inputs, copy the halo into the result (the
exposure bias of Ning et al. 2023 and of DREAM, Zhou et al. 2024, which both retrain on inputs
that carry the model's own error). Here, for a `prob` share of the examples:

  t' = min(t + gap, T - 1),  x_t' = sqrt(ab_t') x0 + sqrt(1 - ab_t') eps
  x0' = the network's estimate at (x_t', t'), gradient stopped
  x_t = sqrt(ab_t) x0' + sqrt(1 - ab_t) eps',  eps' = (x_t' - sqrt(ab_t') x0') / sqrt(1 - ab_t')

which is one deterministic DDIM step from t' to t, and the loss asks for the true x0 at (x_t, t).
It needs x0 prediction (the toy recipe): an epsilon or v target would have to be read from x_t
against the true x0, which divides the estimate's error by sqrt(1 - ab_t) and explodes at low
noise. `gap` = T / (sampling steps) is one step of the evaluation sampler (50 for DDIM with 20).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mre.diffusion.schedule import NoiseSchedule, add_noise, resolve_prediction_type
from mre.diffusion.source_skip import signal_and_noise_scale


def _per_example(values, like):
  return values.reshape((like.shape[0],) + (1,) * (like.ndim - 1)).astype(like.dtype)


def rollout_inputs(
    denoise, schedule: NoiseSchedule, x0, noise, t, image, context, key, prob, gap, **kw
):
  """x_t for the training step: for a `prob` share of the examples, made by one DDIM step from the
  network's own estimate at t + gap (module docstring); for the rest the usual x_t."""
  prediction_type = resolve_prediction_type(schedule)
  if prediction_type != "sample":
    raise ValueError(
        f"train.rollout_prob needs x0 prediction (model.scheduler.prediction_type='sample'), not "
        f"{prediction_type!r}"
    )
  b = x0.shape[0]
  t_before = jnp.minimum(t + gap, schedule.num_train_timesteps - 1)
  noisy_before = add_noise(schedule, x0, noise, t_before)
  sample = jnp.concatenate([noisy_before, image.astype(noisy_before.dtype)], axis=-1)
  estimate = jax.lax.stop_gradient(denoise(sample, t_before, context, **kw).astype(jnp.float32))
  signal_b, scale_b = signal_and_noise_scale(schedule, t_before, b)
  eps_hat = (noisy_before - _per_example(signal_b, x0) * estimate) / _per_example(scale_b, x0)
  signal, scale = signal_and_noise_scale(schedule, t, b)
  rolled = _per_example(signal, x0) * estimate + _per_example(scale, x0) * eps_hat
  use = _per_example(jax.random.bernoulli(key, prob, (b,)), x0) > 0
  return jnp.where(use, rolled, add_noise(schedule, x0, noise, t))


__all__ = ["rollout_inputs"]
