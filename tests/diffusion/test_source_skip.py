"""The source skip (mre/diffusion/source_skip.py): signs and scales, samplers, config, export."""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mre.diffusion import add_noise, make_edit_sampler, make_schedule, training_target
from mre.diffusion.source_skip import denoiser, signal_and_noise_scale, with_source_skip
from mre.model_io import diffusers_folder
from mre.models.config import UNetConfig

SCHEDULE_ARGS = dict(beta_schedule="squaredcos_cap_v2")


def _schedule(prediction_type):
  return make_schedule(**SCHEDULE_ARGS, prediction_type=prediction_type)


def _arrays(seed=0, b=3, n=6, c=3):
  rng = np.random.default_rng(seed)
  x0, source, noise = (jnp.asarray(rng.standard_normal((b, n, n, c)), jnp.float32) for _ in "abc")
  return x0, source, noise, jnp.asarray([3, 410, 987])


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon", "sample"])
def test_a_residual_oracle_gives_the_plain_training_target(prediction_type):
  """F trained on the residual x0 - source: the skip must turn its ideal answer into exactly the
  target InstructPix2Pix regresses, and hand it x_t with the noised source taken out."""
  schedule = _schedule(prediction_type)
  x0, source, noise, t = _arrays()
  noisy = add_noise(schedule, x0, noise, t)
  residual = x0 - source
  seen = {}

  def oracle(sample, timesteps, context):
    seen["input"] = sample
    return training_target(schedule, residual, noise, timesteps)

  wrapped = with_source_skip(oracle, schedule, prediction_type)
  out = wrapped(jnp.concatenate([noisy, source], -1), t, None)
  expected = training_target(schedule, x0, noise, t)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=2e-5)
  shifted = add_noise(schedule, residual, noise, t)
  np.testing.assert_allclose(np.asarray(seen["input"][..., :3]), np.asarray(shifted), atol=2e-5)
  np.testing.assert_array_equal(np.asarray(seen["input"][..., 3:]), np.asarray(source))


def test_without_a_source_the_skip_does_nothing():
  """Dropped source (conditioning dropout, unconditional guidance branches): zeros in, F out."""
  for prediction_type in ("v_prediction", "epsilon", "sample"):
    schedule = _schedule(prediction_type)
    x0, _, noise, t = _arrays(1)
    sample = jnp.concatenate([x0, jnp.zeros_like(x0)], -1)
    fn = lambda s, ts, c: s[..., :3] * 0.7 + 0.1
    np.testing.assert_allclose(
        np.asarray(with_source_skip(fn, schedule, prediction_type)(sample, t, None)),
        np.asarray(fn(sample, t, None)),
        atol=1e-6,
    )


def test_scales_at_integer_and_fractional_timesteps():
  schedule = _schedule("v_prediction")
  ab = np.asarray(schedule.alphas_cumprod, np.float64)
  a, s = signal_and_noise_scale(schedule, jnp.asarray([0, 500, 999]), 3)
  np.testing.assert_allclose(np.asarray(a), np.sqrt(ab[[0, 500, 999]]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(s), np.sqrt(1 - ab[[0, 500, 999]]), rtol=1e-4)
  # Euler sampling: sigma interpolated in t, as the sampler scales its model input.
  sigmas = np.sqrt((1 - ab) / ab)
  sigma = 0.25 * sigmas[500] + 0.75 * sigmas[501]
  a, _ = signal_and_noise_scale(schedule, jnp.float32(500.75), 2)
  np.testing.assert_allclose(np.asarray(a), 1 / np.sqrt(1 + sigma**2), rtol=1e-5)


class _ZeroUNet(nnx.Module):
  """F = 0 everywhere: with the skip and x0-prediction, every step predicts the source."""

  def __init__(self, source_skip):
    self.config = types.SimpleNamespace(source_skip=source_skip)
    self.gain = nnx.Param(jnp.zeros(()))

  def __call__(self, sample, timesteps, context):
    return self.gain[...] * sample[..., :3]


@pytest.mark.parametrize("sampler", ["ddim", "euler_ancestral"])
def test_edit_with_the_skip_returns_the_source_for_a_zero_network(sampler):
  schedule = _schedule("sample")
  _, source, _, _ = _arrays(2, b=2)
  source = jnp.clip(source, -1, 1)
  text, uncond = jnp.ones((2, 4, 8)), jnp.zeros((2, 4, 8))
  edit = make_edit_sampler(schedule, 6, sampler, text_scale=3.0, image_scale=1.0)
  got = edit(_ZeroUNet(True), source, text, uncond, key=jax.random.key(0))
  np.testing.assert_allclose(np.asarray(got), np.asarray(source), atol=1e-4)
  plain = edit(_ZeroUNet(False), source, text, uncond, key=jax.random.key(0))
  assert np.abs(np.asarray(plain) - np.asarray(source)).max() > 0.5


def test_config_key_and_refused_diffusers_export(tmp_path):
  raw = dict(
      in_channels=6,
      out_channels=3,
      block_out_channels=(8, 16),
      down_block_types=("DownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "UpBlock2D"),
      cross_attention_dim=8,
      norm_num_groups=1,
  )
  assert not UNetConfig.from_dict(raw).source_skip
  assert UNetConfig.from_dict({**raw, "mre_source_skip": True}).source_skip
  assert UNetConfig.from_dict(raw).source_skip_sigma_data == 0.0
  both = {**raw, "mre_source_skip": True, "mre_source_skip_sigma_data": 0.5}
  assert UNetConfig.from_dict(both).source_skip_sigma_data == 0.5
  unet = types.SimpleNamespace(config=UNetConfig.from_dict({**raw, "mre_source_skip": True}))
  with pytest.raises(ValueError, match="mre_source_skip"):
    diffusers_folder.save_unet(unet, str(tmp_path / "unet"))
  # The other options of ours are refused by name too, before anything is written.
  for extra in (
      {"mre_noisy_skip": True},
      {"mre_pixel_head": 8, "mre_pixel_head_only": True},
      {"mre_self_condition": True},
  ):
    unet = types.SimpleNamespace(config=UNetConfig.from_dict({**raw, **extra}))
    with pytest.raises(ValueError, match=next(iter(extra))):
      diffusers_folder.save_unet(unet, str(tmp_path / "other"))
  assert not os.path.exists(tmp_path / "unet") and not os.path.exists(tmp_path / "other")
  assert denoiser(types.SimpleNamespace(config=UNetConfig.from_dict(raw)), None) is not None


def test_sigma_data_skip_is_edm_preconditioning_of_the_edit_residual():
  """x0 = x_src + c_skip r_t + c_out F with r_t the noisy residual in x0 units: an oracle F gives
  x0 exactly, F = 0 gives the noisy input itself at low noise and the source at pure noise."""
  schedule, sd = _schedule("sample"), 0.5
  x0, source, noise, t = _arrays(3)
  noisy = add_noise(schedule, x0, noise, t)
  ab = np.asarray(schedule.alphas_cumprod, np.float64)[np.asarray(t)][:, None, None, None]
  sigma = np.sqrt((1 - ab) / ab)
  c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / np.sqrt(sigma**2 + sd**2)
  r_t = (np.asarray(noisy, np.float64) - np.sqrt(ab) * np.asarray(source)) / np.sqrt(ab)
  ideal = (np.asarray(x0 - source, np.float64) - c_skip * r_t) / c_out
  oracle = lambda s, ts, c: jnp.asarray(ideal, jnp.float32)
  sample = jnp.concatenate([noisy, source], -1)
  out = with_source_skip(oracle, schedule, "sample", sigma_data=sd)(sample, t, None)
  np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=1e-4)
  zero = with_source_skip(lambda s, ts, c: 0 * s[..., :3], schedule, "sample", sigma_data=sd)
  out = np.asarray(zero(sample, t, None))
  np.testing.assert_allclose(out, np.asarray(source) + c_skip * r_t, atol=1e-4)
  # t = 3: (nearly) the noisy input in x0 units; t = 987: the source
  assert c_skip[0].item() > 0.99 and c_skip[2].item() < 1e-3
  with pytest.raises(ValueError, match="x0 prediction"):
    with_source_skip(oracle, _schedule("epsilon"), "epsilon", sigma_data=sd)


def test_edm_weight_is_one_at_pure_noise_and_capped():
  from mre.diffusion.schedule import edm_weight, snr  # pylint: disable=import-outside-toplevel

  schedule = _schedule("sample")
  t = jnp.asarray([999, 500, 100, 0])
  w = np.asarray(edm_weight(schedule, t, 0.5, 25.0))
  expected = np.minimum(1 + 0.25 * np.asarray(snr(schedule, t)), 25.0)
  np.testing.assert_allclose(w, expected, rtol=1e-6)
  assert abs(w[0] - 1) < 1e-3 and w[-1] == 25.0 and w[1] < w[2]


def test_affine_skip_applies_a_colour_matrix_per_pixel_to_the_source():
  """x0 = x_src + F + M x_src: M = 0 is the plain skip; a swap of two channels inside one region
  recolours exactly that region, and the dropped source leaves F alone."""
  schedule = _schedule("sample")
  x0, source, noise, t = _arrays(4)
  noisy = add_noise(schedule, x0, noise, t)
  sample = jnp.concatenate([noisy, source], -1)
  rng = np.random.default_rng(5)
  shift = rng.standard_normal(source.shape).astype(np.float32)
  matrix = np.zeros(source.shape[:-1] + (3, 3), np.float32)
  swap = np.asarray([[-1.0, 1.0, 0.0], [1.0, -1.0, 0.0], [0.0, 0.0, 0.0]], np.float32)  # M + I
  matrix[:, 1:3, 2:5] = swap  # swaps channels 0 and 1 there
  out = jnp.asarray(np.concatenate([shift, matrix.reshape(source.shape[:-1] + (9,))], -1))
  affine = with_source_skip(lambda s, ts, c: out, schedule, "sample", affine=True)
  x = np.asarray(affine(sample, t, None))
  src = np.asarray(source)
  expected = src + shift
  expected[:, 1:3, 2:5, 0] += src[:, 1:3, 2:5, 1] - src[:, 1:3, 2:5, 0]
  expected[:, 1:3, 2:5, 1] += src[:, 1:3, 2:5, 0] - src[:, 1:3, 2:5, 1]
  np.testing.assert_allclose(x, expected, atol=1e-5)
  zero_matrix = jnp.concatenate([jnp.asarray(shift), jnp.zeros(source.shape[:-1] + (9,))], -1)
  plain = with_source_skip(lambda s, ts, c: jnp.asarray(shift), schedule, "sample")
  np.testing.assert_allclose(
      np.asarray(
          with_source_skip(lambda s, ts, c: zero_matrix, schedule, "sample", affine=True)(
              sample, t, None
          )
      ),
      np.asarray(plain(sample, t, None)),
      atol=1e-6,
  )
  dropped = jnp.concatenate([noisy, jnp.zeros_like(source)], -1)
  np.testing.assert_allclose(np.asarray(affine(dropped, t, None)), shift, atol=1e-6)


def test_affine_skip_is_refused_where_it_does_not_apply():
  schedule = _schedule("sample")
  three = lambda s, ts, c: s[..., :3]
  x0, source, _, t = _arrays(6)
  with pytest.raises(ValueError, match="needs 12 output channels"):
    with_source_skip(three, schedule, "sample", affine=True)(
        jnp.concatenate([x0, source], -1), t, None
    )
  with pytest.raises(ValueError, match="x0 prediction"):
    with_source_skip(three, _schedule("v_prediction"), "v_prediction", affine=True)
  with pytest.raises(ValueError, match="without source_skip_sigma_data"):
    with_source_skip(three, schedule, "sample", sigma_data=0.5, affine=True)
