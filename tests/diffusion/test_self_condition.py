"""Self-conditioning (mre/diffusion/self_condition.py): the x0 estimate, the training estimate,
the source skip's residual, and one estimate chain per guidance branch in the sampler."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mre.diffusion import add_noise, make_schedule, training_target
from mre.diffusion.editing import edit_latents
from mre.diffusion.self_condition import predicted_x0, self_conditioned, training_estimate
from mre.diffusion.source_skip import with_source_skip
from tests.diffusion.test_source_skip import _arrays as source_skip_arrays


_arrays = functools.partial(source_skip_arrays, n=5)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon", "sample"])
def test_predicted_x0_inverts_the_training_target(prediction_type):
  schedule = make_schedule(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
  x0, _, noise, t = _arrays()
  noisy = add_noise(schedule, x0, noise, t)
  target = training_target(schedule, x0, noise, t)
  got = predicted_x0(schedule, noisy, target, t)
  # epsilon at t = 987 divides by sqrt(alpha_bar) ~ 0.04: float32 rounding grows accordingly
  np.testing.assert_allclose(np.asarray(got), np.asarray(x0), atol=2e-3, rtol=1e-4)


def test_training_estimate_is_the_first_calls_x0_for_the_chosen_share_without_gradient():
  schedule = make_schedule(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
  x0, source, noise, t = _arrays(1, b=64)
  noisy = add_noise(schedule, x0, noise, t[jnp.arange(64) % 3])
  t = t[jnp.arange(64) % 3]
  sample = jnp.concatenate([noisy, source], -1)

  def estimate(weight, prob, key=jax.random.key(0)):
    denoise = lambda s, ts, c, **kw: weight * s[..., :3] + 0.5 * kw["extra"]
    return training_estimate(denoise, schedule, sample, noisy, t, None, key, prob, extra=source)

  first = predicted_x0(schedule, noisy, 2.0 * noisy + 0.5 * source, t)
  np.testing.assert_allclose(np.asarray(estimate(2.0, 1.0)), np.asarray(first), atol=1e-6)
  assert not np.asarray(estimate(2.0, 0.0)).any()
  half = np.asarray(estimate(2.0, 0.5)).reshape(64, -1)
  used = np.abs(half).max(-1) > 0
  assert 16 <= used.sum() <= 48  # about half of 64 examples, each wholly or not at all
  np.testing.assert_allclose(half[used], np.asarray(first).reshape(64, -1)[used], atol=1e-6)
  # The second call learns from the estimate; the first call gets no gradient through it.
  assert float(jax.grad(lambda w: estimate(w, 1.0).sum())(2.0)) == 0.0


def test_the_source_skip_hands_the_estimate_over_as_its_edit_residual():
  schedule = make_schedule(beta_schedule="squaredcos_cap_v2", prediction_type="sample")
  x0, source, noise, t = _arrays(2)
  noisy = add_noise(schedule, x0, noise, t)
  seen = {}

  def unet(sample, timesteps, context, self_cond=None):
    seen["self_cond"] = self_cond
    return jnp.zeros_like(source)

  wrapped = with_source_skip(unet, schedule, "sample")
  out = wrapped(jnp.concatenate([noisy, source], -1), t, None, self_cond=x0)
  np.testing.assert_allclose(np.asarray(seen["self_cond"]), np.asarray(x0 - source), atol=1e-6)
  np.testing.assert_allclose(np.asarray(out), np.asarray(source))  # F = 0: the source
  wrapped(jnp.concatenate([noisy, source], -1), t, None)
  assert seen["self_cond"] is None  # nothing made up when the caller gives no estimate


class _CountingUNet:
  """x0 prediction that adds `step` to the estimate it reads wherever the source is present (the
  full and image branches) and halves it where the source is dropped (the unconditional branch,
  whose own chain so stays at 0)."""

  config = types.SimpleNamespace(self_condition=True)
  step = 0.1

  def __call__(self, sample, timesteps, context, self_cond=None):
    has_source = jnp.abs(sample[..., 3:]).max(axis=(1, 2, 3), keepdims=True) > 0
    return jnp.where(has_source, self_cond + self.step, 0.5 * self_cond)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_each_guidance_branch_reads_its_own_previous_estimate(sampler):
  """After n steps the full and image branches have estimated n * step and the unconditional
  branch 0, so the guided final image is s_I * n * step; an estimate shared across branches (or
  none) would give another value."""
  schedule = make_schedule(
      beta_schedule="squaredcos_cap_v2", prediction_type="sample", clip_sample=False
  )
  unet = _CountingUNet()
  assert self_conditioned(unet) and not self_conditioned(lambda *a: a)
  source = jnp.ones((2, 4, 4, 3), jnp.float32)
  text = jnp.ones((2, 3, 8), jnp.float32)
  steps, image_scale = 6, 1.5
  out = edit_latents(
      unet,
      source,
      text,
      jnp.zeros((1, 3, 8), jnp.float32),
      schedule,
      num_steps=steps,
      sampler=sampler,
      key=jax.random.key(0),
      text_scale=3.0,
      image_scale=image_scale,
  )
  np.testing.assert_allclose(np.asarray(out), image_scale * steps * unet.step, atol=1e-4)
