"""Noise schedule, forward process and training targets against diffusers; reading configs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler
from diffusers.training_utils import compute_snr

from mre.diffusion import (
    add_noise,
    make_schedule,
    min_snr_weight,
    sampling_timesteps,
    schedule_from_config,
    snr,
    training_target,
    velocity,
)
from tests.diffusion._reference import SD15_SCHEDULER_CONFIG


@pytest.mark.parametrize(
    "beta_schedule,beta_start,beta_end",
    [
        ("scaled_linear", 0.00085, 0.012),
        ("linear", 0.0001, 0.02),
        ("squaredcos_cap_v2", 0.0001, 0.02),
    ],
)
def test_betas_and_alphas_cumprod_match_diffusers(beta_schedule, beta_start, beta_end):
  config = dict(beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end)
  reference = DDPMScheduler.from_config(config)
  schedule = schedule_from_config(config)
  assert schedule.betas.dtype == jnp.float32 and schedule.alphas_cumprod.shape == (1000,)
  # torch.linspace's vectorised float32 arithmetic differs from numpy's by ~1 ulp in sqrt(beta).
  np.testing.assert_allclose(np.asarray(schedule.betas), reference.betas.numpy(), rtol=5e-7, atol=0)
  np.testing.assert_allclose(
      np.asarray(schedule.alphas_cumprod), reference.alphas_cumprod.numpy(), rtol=2e-6, atol=0
  )


def test_sd15_defaults():
  schedule = make_schedule()
  np.testing.assert_allclose(float(schedule.betas[0]), 0.00085, rtol=1e-6)
  np.testing.assert_allclose(float(schedule.betas[-1]), 0.012, rtol=1e-6)
  np.testing.assert_allclose(float(schedule.alphas_cumprod[-1]), 0.0046600, rtol=1e-4)


def test_add_noise_and_velocity_match_diffusers():
  reference = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
  schedule = schedule_from_config(SD15_SCHEDULER_CONFIG)
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((5, 4, 6, 6)).astype(np.float32)
  noise = rng.standard_normal((5, 4, 6, 6)).astype(np.float32)
  t = np.array([0, 1, 17, 500, 999])

  expected_noisy = reference.add_noise(
      torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
  )
  expected_v = reference.get_velocity(
      torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)
  )
  noisy = jax.jit(add_noise)(schedule, x0, noise, t)
  np.testing.assert_allclose(np.asarray(noisy), expected_noisy.numpy(), rtol=0, atol=2e-6)
  np.testing.assert_allclose(
      np.asarray(velocity(schedule, x0, noise, t)), expected_v.numpy(), rtol=0, atol=2e-6
  )

  # Training targets: the noise itself, or the velocity.
  np.testing.assert_array_equal(np.asarray(training_target(schedule, x0, noise, t)), noise)
  np.testing.assert_allclose(
      np.asarray(training_target(schedule, x0, noise, t, "v_prediction")),
      expected_v.numpy(),
      rtol=0,
      atol=2e-6,
  )
  # 'sample': the clean x0 itself.
  np.testing.assert_array_equal(np.asarray(training_target(schedule, x0, noise, t, "sample")), x0)
  with pytest.raises(ValueError, match="prediction_type"):
    training_target(schedule, x0, noise, t, "flow_prediction")


def test_snr_and_min_snr_weights_match_diffusers_recipe():
  reference = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
  schedule = schedule_from_config(SD15_SCHEDULER_CONFIG)
  t = np.array([0, 50, 200, 500, 999])
  expected_snr = compute_snr(reference, torch.from_numpy(t))
  np.testing.assert_allclose(np.asarray(snr(schedule, t)), expected_snr.numpy(), rtol=1e-5)

  # diffusers' train scripts: min(snr, gamma) / snr (epsilon) or / (snr + 1) (v-prediction).
  clipped = torch.clamp(expected_snr, max=5.0)
  np.testing.assert_allclose(
      np.asarray(min_snr_weight(schedule, t, 5.0)), (clipped / expected_snr).numpy(), rtol=1e-5
  )
  np.testing.assert_allclose(
      np.asarray(min_snr_weight(schedule, t, 5.0, "v_prediction")),
      (clipped / (expected_snr + 1)).numpy(),
      rtol=1e-5,
  )
  # The target is x0 itself: the weight on the x0 error is min(snr, gamma) unchanged.
  np.testing.assert_allclose(
      np.asarray(min_snr_weight(schedule, t, 5.0, "sample")), clipped.numpy(), rtol=1e-5
  )
  weights = np.asarray(min_snr_weight(schedule, t, 5.0))
  assert weights[0] < 0.01 and weights[-1] == 1.0  # low-noise steps are down-weighted


def test_config_from_folder_file_and_dict(tmp_path):
  pipeline = tmp_path / "pipeline"
  (pipeline / "scheduler").mkdir(parents=True)
  config_file = pipeline / "scheduler" / "scheduler_config.json"
  config_file.write_text(json.dumps(SD15_SCHEDULER_CONFIG))
  loaded = [
      schedule_from_config(source)
      for source in (
          pipeline,
          pipeline / "scheduler",
          config_file,
          str(config_file),
          SD15_SCHEDULER_CONFIG,
      )
  ]
  for schedule in loaded[1:]:
    np.testing.assert_array_equal(
        np.asarray(schedule.alphas_cumprod), np.asarray(loaded[0].alphas_cumprod)
    )
    assert schedule.steps_offset == 1 and schedule.set_alpha_to_one is False
    assert schedule.clip_sample is False and schedule.timestep_spacing is None


@pytest.mark.parametrize(
    "extra", [{}, {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}]
)
def test_a_config_folder_reads_as_diffusers_reads_it(tmp_path, extra):
  config = {**SD15_SCHEDULER_CONFIG, "_class_name": "EulerAncestralDiscreteScheduler", **extra}
  (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
  schedule = schedule_from_config(tmp_path)
  for cls, sampler in (
      (EulerAncestralDiscreteScheduler, "euler_ancestral"),
      (DDIMScheduler, "ddim"),
  ):
    reference = cls.from_pretrained(tmp_path)
    reference.set_timesteps(30)
    np.testing.assert_array_equal(
        reference.timesteps.numpy(), sampling_timesteps(schedule, 30, sampler)
    )
    assert reference.config.prediction_type == schedule.prediction_type


@pytest.mark.parametrize(
    "key,value",
    [
        ("beta_schedule", "sigmoid"),
        ("timestep_spacing", "uniform"),
        ("prediction_type", "flow_prediction"),
        ("use_karras_sigmas", True),
        ("rescale_betas_zero_snr", True),
        ("thresholding", True),
        ("algorithm_type", "sde-dpmsolver++"),
        ("final_sigmas_type", "max"),
        ("lambda_min_clipped", -5.1),
    ],
)
def test_unsupported_config_values_name_the_key(key, value):
  with pytest.raises(ValueError, match=key):
    schedule_from_config({**SD15_SCHEDULER_CONFIG, key: value})


def test_schedule_is_a_jit_argument_without_retracing():
  traces = []

  @jax.jit
  def noisy(schedule, x0):
    traces.append(1)
    return add_noise(schedule, x0, jnp.ones_like(x0), jnp.array([10, 900]))

  x0 = jnp.zeros((2, 3))
  schedule = make_schedule()
  a = noisy(schedule, x0)
  b = noisy(schedule.replace(alphas_cumprod=schedule.alphas_cumprod**2), x0)  # new arrays only
  assert len(traces) == 1 and not np.allclose(np.asarray(a), np.asarray(b))
