"""Rollout training (mre/diffusion/rollout.py): inputs made by one DDIM step from the model's own
estimate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mre.diffusion import add_noise, make_schedule
from mre.diffusion.rollout import rollout_inputs
from mre.diffusion.samplers import ddim_step


def _arrays(b=4, n=5, c=3):
  rng = np.random.default_rng(0)
  x0, image, noise = (jnp.asarray(rng.standard_normal((b, n, n, c)), jnp.float32) for _ in "abc")
  return x0, image, noise, jnp.asarray([0, 120, 600, 990])


def _rollout(denoise, prob, prediction_type="sample", gap=50):
  schedule = make_schedule(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
  x0, image, noise, t = _arrays()
  key = jax.random.key(1)
  got = rollout_inputs(denoise, schedule, x0, noise, t, image, None, key, prob, gap)
  return schedule, x0, noise, t, got


def test_without_rollout_or_with_an_exact_estimate_it_is_the_usual_noisy_input():
  true_x0 = _arrays()[0]
  schedule, x0, noise, t, got = _rollout(lambda s, tt, c: jnp.zeros_like(true_x0), 0.0)
  np.testing.assert_allclose(np.asarray(got), np.asarray(add_noise(schedule, x0, noise, t)))
  schedule, x0, noise, t, got = _rollout(lambda s, tt, c: true_x0, 1.0)
  np.testing.assert_allclose(
      np.asarray(got), np.asarray(add_noise(schedule, x0, noise, t)), atol=2e-5
  )


def test_a_wrong_estimate_is_carried_one_ddim_step_down():
  """An estimate off by `delta` at t + gap: the input at t is the DDIM step from there (t + gap
  clipped to the last timestep), whatever the image condition; the estimate gets no gradient."""
  delta = 0.3
  seen = {}

  def shifted(sample, t, context):
    seen["t"], seen["image"] = t, sample[..., 3:]
    return true_x0 + delta

  true_x0 = _arrays()[0]
  schedule, x0, noise, t, got = _rollout(shifted, 1.0)
  np.testing.assert_array_equal(np.asarray(seen["t"]), [50, 170, 650, 999])
  np.testing.assert_array_equal(np.asarray(seen["image"]), np.asarray(_arrays()[1]))
  ab = np.asarray(schedule.alphas_cumprod)
  for i, (ti, tb) in enumerate(zip([0, 120, 600, 990], [50, 170, 650, 999])):
    before = add_noise(schedule, x0[i : i + 1], noise[i : i + 1], jnp.asarray([tb]))
    want = ddim_step(before, x0[i : i + 1] + delta, ab[tb], ab[ti], prediction_type="sample")
    np.testing.assert_allclose(np.asarray(got[i : i + 1]), np.asarray(want), atol=2e-5)
  grad = jax.grad(
      lambda d: rollout_inputs(
          lambda s, tt, c: true_x0 + d,
          schedule,
          x0,
          noise,
          t,
          _arrays()[1],
          None,
          jax.random.key(0),
          1.0,
          50,
      ).sum()
  )(delta)
  assert float(grad) == 0.0


def test_about_prob_of_the_examples_roll_out():
  schedule = make_schedule(beta_schedule="squaredcos_cap_v2", prediction_type="sample")
  rng = np.random.default_rng(3)
  x0, noise = (jnp.asarray(rng.standard_normal((200, 2, 2, 3)), jnp.float32) for _ in "ab")
  t = jnp.full((200,), 300)
  got = rollout_inputs(
      lambda s, tt, c: x0 + 1.0, schedule, x0, noise, t, x0, None, jax.random.key(2), 0.25, 50
  )
  moved = np.abs(np.asarray(got - add_noise(schedule, x0, noise, t))).reshape(200, -1).max(-1)
  assert 30 <= int((moved > 1e-3).sum()) <= 70


def test_other_prediction_types_are_refused():
  with pytest.raises(ValueError, match="x0 prediction"):
    _rollout(lambda s, t, c: s[..., :3], 0.5, prediction_type="epsilon")
