"""Dual classifier-free guidance against StableDiffusionInstructPix2PixPipeline, and the jitted editor."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionInstructPix2PixPipeline,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete
from flax import nnx

from mre.diffusion import dual_guidance, edit_latents, make_edit_sampler, schedule_from_config
from tests.diffusion._reference import SD15_SCHEDULER_CONFIG

B, H, W, L, D = 2, 8, 8, 5, 6


def _random_inputs(seed=0):
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((B, H, W, 4)).astype(np.float32)
  image = rng.standard_normal((B, H, W, 4)).astype(np.float32)
  text = rng.standard_normal((B, L, D)).astype(np.float32)
  uncond = rng.standard_normal((1, L, D)).astype(np.float32)
  return latents, image, text, uncond


def _fake_unet_jax(sample, timesteps, context, scores=None):
  """NHWC fake U-Net: every input (latent, image latent, context, timestep, extra) shows in the output."""
  latent, image = sample[..., :4], sample[..., 4:]
  context_mean = context.mean(axis=(1, 2))[:, None, None, None]
  t = timesteps.astype(jnp.float32)[:, None, None, None]
  out = 0.9 * latent + 0.1 * jnp.sin(t / 100 + image) + 0.2 * context_mean
  if scores is not None:
    out = out + 0.05 * scores.sum(axis=1)[:, None, None, None]
  return out


class _Recorder:

  def __init__(self):
    self.calls = []

  def __call__(self, sample, timesteps, context, **extra):
    self.calls.append((sample, timesteps, context, extra))
    return _fake_unet_jax(sample, timesteps, context, **extra)


def test_dual_guidance_matches_pipeline_batch_and_arithmetic():
  latents, image, text, uncond = _random_inputs()
  model = _Recorder()
  guided = dual_guidance(model, latents, image, text, uncond, jnp.float32(501.0), 7.5, 1.5)

  ((sample, timesteps, context, extra),) = model.calls
  # One call on 3B rows: latents [x, x, x] | image [img, img, 0], contexts [text, uncond, uncond].
  np.testing.assert_array_equal(sample[..., :4], np.concatenate([latents] * 3))
  np.testing.assert_array_equal(sample[..., 4:], np.concatenate([image, image, 0 * image]))
  np.testing.assert_array_equal(
      context, np.concatenate([text, np.repeat(uncond, B, 0), np.repeat(uncond, B, 0)])
  )
  np.testing.assert_array_equal(timesteps, np.full(3 * B, 501.0, np.float32))
  assert extra == {}

  # The pipeline's own arithmetic, in torch, on the same model output.
  noise_pred = torch.from_numpy(np.asarray(_fake_unet_jax(sample, timesteps, context)))
  noise_pred_text, noise_pred_image, noise_pred_uncond = noise_pred.chunk(3)
  expected = (
      noise_pred_uncond
      + 7.5 * (noise_pred_text - noise_pred_image)
      + 1.5 * (noise_pred_image - noise_pred_uncond)
  )
  np.testing.assert_allclose(np.asarray(guided), expected.numpy(), rtol=0, atol=1e-6)
  assert np.abs(expected.numpy()).max() > 0.1

  # Per-example timesteps follow their example into every branch.
  dual_guidance(model, latents, image, text, uncond, jnp.asarray([10.0, 20.0]))
  np.testing.assert_array_equal(model.calls[-1][1], [10.0, 20.0] * 3)


@pytest.mark.parametrize("text_scale,image_scale", [(1.0, 1.5), (7.5, 0.5)])
def test_guidance_switched_off_like_the_pipeline(text_scale, image_scale):
  """diffusers runs a single conditioned branch unless text_scale > 1 and image_scale >= 1."""
  latents, image, text, uncond = _random_inputs()
  model = _Recorder()
  out = dual_guidance(model, latents, image, text, uncond, 10, text_scale, image_scale)
  ((sample, _, context, _),) = model.calls
  assert sample.shape[0] == B
  np.testing.assert_array_equal(context, text)
  expected = _fake_unet_jax(jnp.concatenate([latents, image], -1), jnp.full((B,), 10), text)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=0, atol=1e-6)


def test_extra_condition_and_reward_guidance_branch():
  latents, image, text, uncond = _random_inputs()
  scores = {"scores": jnp.asarray([[5.0, 5.0, 5.0], [4.0, 3.0, 5.0]])}
  neutral = {"scores": jnp.zeros((B, 3))}

  model = _Recorder()
  three = dual_guidance(model, latents, image, text, uncond, 10, 7.5, 1.5, extra_cond=scores)
  np.testing.assert_array_equal(model.calls[0][3]["scores"], np.concatenate([scores["scores"]] * 3))

  model = _Recorder()
  four = dual_guidance(
      model,
      latents,
      image,
      text,
      uncond,
      10,
      7.5,
      1.5,
      extra_cond=scores,
      extra_cond_uncond=neutral,
      reward_scale=2.0,
  )
  ((sample, _, context, extra),) = model.calls
  assert sample.shape[0] == 4 * B
  # Branch 3 = branch 0 with the unconditional reward.
  np.testing.assert_array_equal(sample[3 * B :], sample[:B])
  np.testing.assert_array_equal(context[3 * B :], text)
  np.testing.assert_array_equal(extra["scores"][3 * B :], neutral["scores"])
  eps = np.split(np.asarray(_fake_unet_jax(sample, jnp.full((4 * B,), 10), context, **extra)), 4)
  expected = eps[2] + 7.5 * (eps[0] - eps[1]) + 1.5 * (eps[1] - eps[2]) + 2.0 * (eps[0] - eps[3])
  np.testing.assert_allclose(np.asarray(four), expected, rtol=0, atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(four) - np.asarray(three), 2.0 * (eps[0] - eps[3]), atol=1e-5
  )

  with pytest.raises(ValueError, match="extra_cond_uncond"):
    dual_guidance(model, latents, image, text, uncond, 10, extra_cond=scores, reward_scale=2.0)


# --- the whole editing loop against the real diffusers pipeline -----------------------------------


class _FakeTorchUNet(torch.nn.Module):
  """The same fake U-Net in torch (NCHW), with what the pipeline reads from a U-Net."""

  def __init__(self):
    super().__init__()
    self.config = types.SimpleNamespace(in_channels=8)
    self.dtype, self.device = torch.float32, torch.device("cpu")

  def forward(self, sample, t, encoder_hidden_states, **unused):
    latent, image = sample[:, :4], sample[:, 4:]
    context_mean = encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None]
    return (0.9 * latent + 0.1 * torch.sin(t.float() / 100 + image) + 0.2 * context_mean,)


def _run_pipeline(scheduler, latents, image, text, uncond, step_noise, monkeypatch):
  tiny_vae = AutoencoderKL(  # only its config is read (latent channels, scale factor)
      block_out_channels=(8,),
      down_block_types=("DownEncoderBlock2D",),
      up_block_types=("UpDecoderBlock2D",),
      norm_num_groups=8,
      layers_per_block=1,
  )
  pipe = StableDiffusionInstructPix2PixPipeline(
      vae=tiny_vae,
      text_encoder=None,
      tokenizer=None,
      unet=_FakeTorchUNet(),
      scheduler=scheduler,
      safety_checker=None,
      feature_extractor=None,
      requires_safety_checker=False,
  )
  pipe.set_progress_bar_config(disable=True)
  draws = iter(step_noise)
  monkeypatch.setattr(
      scheduling_euler_ancestral_discrete,
      "randn_tensor",
      lambda *args, **kwargs: torch.from_numpy(next(draws)),
  )
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
  out = pipe(
      image=nchw(image),  # 4 channels: taken as image latents as they are
      prompt_embeds=torch.from_numpy(text),
      negative_prompt_embeds=torch.from_numpy(np.repeat(uncond, B, 0)),
      latents=nchw(latents),
      num_inference_steps=30,
      guidance_scale=7.5,
      image_guidance_scale=1.5,
      output_type="latent",
  )
  return out.images.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize(
    "sampler,scheduler_class",
    [
        ("euler_ancestral", EulerAncestralDiscreteScheduler),
        ("ddim", DDIMScheduler),
        ("dpmpp_2m", DPMSolverMultistepScheduler),
    ],
)
def test_edit_matches_instruct_pix2pix_pipeline(sampler, scheduler_class, monkeypatch):
  latents, image, text, uncond = _random_inputs(1)
  step_noise = np.random.default_rng(2).standard_normal((30, B, 4, H, W)).astype(np.float32)
  expected = _run_pipeline(
      scheduler_class.from_config(SD15_SCHEDULER_CONFIG),
      latents,
      image,
      text,
      uncond,
      step_noise,
      monkeypatch,
  )

  edit = make_edit_sampler(
      schedule_from_config(SD15_SCHEDULER_CONFIG), 30, sampler, text_scale=7.5, image_scale=1.5
  )
  got = edit(
      _fake_unet_jax,
      image,
      text,
      uncond,
      noise=latents,
      step_noise=step_noise.transpose(0, 1, 3, 4, 2),
  )
  assert np.abs(expected).max() > 0.5
  np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-5)


class _NNXFakeUNet(nnx.Module):
  traces = []  # Python side, class level: counts traces, not executions

  def __init__(self):
    self.latent_gain = nnx.Param(jnp.asarray(0.9))

  def __call__(self, sample, timesteps, context):
    self.traces.append(1)
    out = _fake_unet_jax(sample, timesteps, context)
    return out + (self.latent_gain[...] - 0.9) * sample[..., :4]


def test_edit_sampler_with_nnx_unet_is_one_compiled_computation():
  latents, image, text, uncond = _random_inputs(3)
  schedule = schedule_from_config(SD15_SCHEDULER_CONFIG)
  _NNXFakeUNet.traces.clear()
  unet = _NNXFakeUNet()
  edit = make_edit_sampler(schedule, 30, "euler_ancestral")

  first = edit(unet, image, text, uncond, key=jax.random.key(42))
  again = edit(unet, image, text, uncond, key=jax.random.key(42))
  other_seed = edit(unet, image, text, uncond, key=jax.random.key(7))
  unet.latent_gain[...] = jnp.asarray(0.8)  # new weights: traced state, no recompilation
  new_weights = edit(unet, image, text, uncond, key=jax.random.key(42))
  assert len(_NNXFakeUNet.traces) == 1
  np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
  assert np.abs(np.asarray(first) - np.asarray(other_seed)).max() > 1e-2
  assert np.abs(np.asarray(first) - np.asarray(new_weights)).max() > 1e-3

  # Same numbers as the un-jitted composition with the same key.
  unet.latent_gain[...] = jnp.asarray(0.9)
  eager = edit_latents(unet, image, text, uncond, schedule, key=jax.random.key(42))
  np.testing.assert_allclose(np.asarray(eager), np.asarray(first), rtol=0, atol=1e-5)
