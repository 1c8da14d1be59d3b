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

from mre.diffusion.samplers import ddim_step
from mre.diffusion.schedule import NoiseSchedule, add_noise, resolve_prediction_type


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
  per_example = lambda v: v.reshape((x0.shape[0],) + (1,) * (x0.ndim - 1))  # noqa: E731
  t_before = jnp.minimum(t + gap, schedule.num_train_timesteps - 1)
  noisy_before = add_noise(schedule, x0, noise, t_before)
  sample = jnp.concatenate([noisy_before, image.astype(noisy_before.dtype)], axis=-1)
  estimate = jax.lax.stop_gradient(denoise(sample, t_before, context, **kw).astype(jnp.float32))
  alpha_bar = schedule.alphas_cumprod.astype(jnp.float32)
  rolled = ddim_step(
      noisy_before,
      estimate,
      per_example(alpha_bar[t_before]),
      per_example(alpha_bar[t]),
      prediction_type="sample",
  )
  use = per_example(jax.random.bernoulli(key, prob, (x0.shape[0],)))
  return jnp.where(use, rolled, add_noise(schedule, x0, noise, t))


__all__ = ["rollout_inputs"]
