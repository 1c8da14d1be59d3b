"""Sampler parity with diffusers' PyTorch schedulers, run for run, and one-trace compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete

from mre.diffusion import (
    init_noise_sigma,
    sample,
    sampling_sigmas,
    sampling_timesteps,
    schedule_from_config,
    timestep_spacing,
)
from tests.diffusion._reference import SD15_SCHEDULER_CONFIG, fake_model_jax, fake_model_torch

SCHEDULER_CLASSES = {
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "ddim": DDIMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}
SHAPE = (2, 4, 8, 8)


def _torch_run(scheduler, latents, step_noise, eta, monkeypatch):
  """The pipeline's loop: scale_model_input -> model -> step, with injected step noise."""
  draws = iter(step_noise)
  # Euler-ancestral draws its noise inside step(); hand it ours instead.
  monkeypatch.setattr(
      scheduling_euler_ancestral_discrete,
      "randn_tensor",
      lambda *args, **kwargs: torch.from_numpy(next(draws)),
  )
  x = torch.from_numpy(latents) * scheduler.init_noise_sigma
  for i, t in enumerate(scheduler.timesteps):
    out = fake_model_torch(scheduler.scale_model_input(x, t), t)
    kwargs = {}
    if isinstance(scheduler, DDIMScheduler):
      kwargs = dict(eta=eta, variance_noise=torch.from_numpy(step_noise[i]))
    x = scheduler.step(out, t, x, **kwargs).prev_sample
  return x.numpy()


def _jax_run(schedule, sampler, num_steps, latents, step_noise, eta, prediction_type=None):
  @jax.jit
  def run(latents, step_noise):
    x = latents * init_noise_sigma(schedule, num_steps, sampler)
    return sample(
        fake_model_jax,
        x,
        schedule,
        num_steps,
        sampler=sampler,
        eta=eta,
        noise=step_noise,
        prediction_type=prediction_type,
    )

  return np.asarray(run(jnp.asarray(latents), jnp.asarray(step_noise)))


CASES = [  # sampler, eta, extra config
    ("euler_ancestral", 0.0, {}),
    ("euler", 0.0, {}),
    ("ddim", 0.0, {}),
    ("ddim", 0.5, {}),
    ("dpmpp_2m", 0.0, {}),
    ("euler_ancestral", 0.0, {"prediction_type": "v_prediction"}),
    ("euler", 0.0, {"prediction_type": "v_prediction"}),
    ("ddim", 0.5, {"prediction_type": "v_prediction"}),
    ("dpmpp_2m", 0.0, {"prediction_type": "v_prediction"}),
    ("euler", 0.0, {"prediction_type": "sample"}),  # the model predicts x0 itself
    ("ddim", 0.5, {"prediction_type": "sample"}),
    ("dpmpp_2m", 0.0, {"prediction_type": "sample"}),
    ("euler_ancestral", 0.0, {"timestep_spacing": "leading"}),  # init sigma sqrt(s^2 + 1)
    ("euler", 0.0, {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}),
    ("ddim", 0.0, {"timestep_spacing": "trailing"}),
    ("dpmpp_2m", 0.0, {"timestep_spacing": "leading"}),
    ("dpmpp_2m", 0.0, {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}),
]


@pytest.mark.parametrize("sampler,eta,extra", CASES, ids=lambda v: str(v))
def test_full_run_matches_diffusers(sampler, eta, extra, monkeypatch):
  num_steps = 30
  config = {**SD15_SCHEDULER_CONFIG, **extra}
  rng = np.random.default_rng(0)
  latents = rng.standard_normal(SHAPE).astype(np.float32)
  step_noise = rng.standard_normal((num_steps,) + SHAPE).astype(np.float32)

  reference = SCHEDULER_CLASSES[sampler].from_config(config)
  reference.set_timesteps(num_steps)
  expected = _torch_run(reference, latents, step_noise, eta, monkeypatch)
  got = _jax_run(schedule_from_config(config), sampler, num_steps, latents, step_noise, eta)

  assert np.isfinite(expected).all() and np.abs(expected).max() > 0.5  # a real, non-trivial run
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_euler_ancestral_sample_prediction_equals_epsilon_run():
  """diffusers' Euler-ancestral does not implement 'sample'; ours must follow the same path as
  with an epsilon model whose implied x0 it is given."""
  config = {**SD15_SCHEDULER_CONFIG}
  schedule = schedule_from_config(config)
  num_steps, rng = 20, np.random.default_rng(3)
  latents = jnp.asarray(rng.standard_normal(SHAPE).astype(np.float32))
  step_noise = jnp.asarray(rng.standard_normal((num_steps,) + SHAPE).astype(np.float32))
  sigmas = sampling_sigmas(schedule, num_steps, "euler_ancestral")
  timesteps = jnp.asarray(sampling_timesteps(schedule, num_steps, "euler_ancestral"))

  def x0_model(model_input, t):  # the x0 that fake_model_jax's epsilon implies
    sigma = sigmas[jnp.argmin(jnp.abs(timesteps - t))]
    x = model_input * (sigma**2 + 1) ** 0.5
    return x - sigma * fake_model_jax(model_input, t)

  x = latents * init_noise_sigma(schedule, num_steps, "euler_ancestral")
  expected = sample(
      fake_model_jax,
      x,
      schedule,
      num_steps,
      sampler="euler_ancestral",
      noise=step_noise,
      prediction_type="epsilon",
  )
  got = sample(
      x0_model,
      x,
      schedule,
      num_steps,
      sampler="euler_ancestral",
      noise=step_noise,
      prediction_type="sample",
  )
  assert float(jnp.abs(expected).max()) > 0.5
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=0, atol=1e-4)


def test_ddim_class_defaults_clip_and_final_alpha(monkeypatch):
  """A config without clip_sample / set_alpha_to_one gets DDIM's defaults (True, True)."""
  config = {
      k: v for k, v in SD15_SCHEDULER_CONFIG.items() if k not in ("clip_sample", "set_alpha_to_one")
  }
  rng = np.random.default_rng(1)
  latents = 3 * rng.standard_normal(SHAPE).astype(np.float32)  # large, so clipping bites
  step_noise = np.zeros((20,) + SHAPE, np.float32)
  reference = DDIMScheduler.from_config(config)
  reference.set_timesteps(20)
  expected = _torch_run(reference, latents, step_noise, 0.0, monkeypatch)
  got = _jax_run(schedule_from_config(config), "ddim", 20, latents, step_noise, 0.0)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spacing", [None, "linspace", "leading", "trailing"])
@pytest.mark.parametrize("num_steps", [7, 30, 50])
@pytest.mark.parametrize("sampler", list(SCHEDULER_CLASSES))
def test_timesteps_sigmas_and_init_sigma_match_diffusers(sampler, num_steps, spacing):
  config = dict(SD15_SCHEDULER_CONFIG)
  if spacing is not None:
    config["timestep_spacing"] = spacing
  reference = SCHEDULER_CLASSES[sampler].from_config(config)
  reference.set_timesteps(num_steps)
  schedule = schedule_from_config(config)

  assert timestep_spacing(schedule, sampler) == reference.config.timestep_spacing
  timesteps = sampling_timesteps(schedule, num_steps, sampler)
  np.testing.assert_array_equal(timesteps, reference.timesteps.numpy())
  assert timesteps.dtype == reference.timesteps.numpy().dtype
  if sampler != "ddim":
    np.testing.assert_allclose(
        np.asarray(sampling_sigmas(schedule, num_steps, sampler)),
        reference.sigmas.numpy(),
        rtol=1e-6,
        atol=0,
    )
  np.testing.assert_allclose(
      float(init_noise_sigma(schedule, num_steps, sampler)),
      float(reference.init_noise_sigma),
      rtol=1e-6,
  )


def test_sd15_euler_ancestral_uses_linspace_not_leading():
  """The SD 1.5 config carries steps_offset 1 but no timestep_spacing: Euler samplers then use
  their class default 'linspace' (steps_offset unused), DDIM its default 'leading' (+1)."""
  schedule = schedule_from_config(SD15_SCHEDULER_CONFIG)
  euler = sampling_timesteps(schedule, 30, "euler_ancestral")
  np.testing.assert_allclose(euler[:3], [999.0, 964.5517, 930.10345], rtol=1e-6)
  assert euler[-1] == 0.0
  ddim = sampling_timesteps(schedule, 30, "ddim")
  assert list(ddim[:2]) == [958, 925] and ddim[-1] == 1
  np.testing.assert_allclose(
      float(init_noise_sigma(schedule, 30, "euler_ancestral")), 14.614647, rtol=1e-6
  )


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m"])
def test_loop_is_traced_once(sampler):
  """The 30-step loop is one compiled computation: the denoiser's Python body runs at trace time
  only, once, and a second call with new values reuses the compiled program."""
  schedule = schedule_from_config(SD15_SCHEDULER_CONFIG)
  traces = []

  def denoise(x, t):
    traces.append(t)
    return fake_model_jax(x, t)

  run = jax.jit(lambda x, key: sample(denoise, x, schedule, 30, key, sampler=sampler))
  first = run(jnp.ones(SHAPE), jax.random.key(0))
  second = run(2 * jnp.ones(SHAPE), jax.random.key(1))
  assert len(traces) == 1
  assert not np.allclose(np.asarray(first), np.asarray(second))


def test_step_noise_from_key():
  schedule = schedule_from_config(SD15_SCHEDULER_CONFIG)
  x = jnp.ones(SHAPE)

  def run(sampler, key, eta=0.0):
    return np.asarray(sample(fake_model_jax, x, schedule, 10, key, sampler=sampler, eta=eta))

  a, b, c = (run("euler_ancestral", jax.random.key(k)) for k in (0, 0, 1))
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-2
  # Deterministic samplers ignore the key; stochastic ones refuse to run without noise.
  np.testing.assert_array_equal(run("ddim", jax.random.key(0)), run("ddim", None))
  with pytest.raises(ValueError, match="key"):
    run("ddim", None, eta=0.5)
  with pytest.raises(ValueError, match="noise"):
    sample(
        fake_model_jax, x, schedule, 10, sampler="euler_ancestral", noise=jnp.zeros((9,) + SHAPE)
    )
  with pytest.raises(ValueError, match="sampler"):
    sample(fake_model_jax, x, schedule, 10, sampler="heun")
