"""U-Net parity with diffusers' UNet2DConditionModel (8 input channels, as InstructPix2Pix)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mre.model_io import torch_state_dict
from mre.models.config import ConfigError
from mre.models.unet import UNet2DConditionModel
from tests.reference import UNET_CONFIGS, nchw, nhwc, randomize, torch


def _pair(name):
  from diffusers import UNet2DConditionModel as TorchUNet

  torch.manual_seed(0)
  ref = randomize(TorchUNet(**UNET_CONFIGS[name]), 7)
  ours = UNet2DConditionModel(dict(ref.config), rngs=nnx.Rngs(0))
  torch_state_dict.load_state_dict(
      ours, {k: v.numpy() for k, v in ref.state_dict().items()}, where=name
  )
  return ref, ours


@pytest.mark.parametrize("name", sorted(UNET_CONFIGS))
def test_unet_matches_diffusers(name):
  ref, ours = _pair(name)
  rs = np.random.RandomState(0)
  x = rs.randn(2, 8, 16, 16).astype(np.float32)
  ctx = rs.randn(2, 5, ref.config.cross_attention_dim).astype(np.float32)
  t = np.array([3, 951])
  with torch.no_grad():
    want = ref(torch.tensor(x), torch.tensor(t), torch.tensor(ctx)).sample.numpy()
  got = nnx.jit(lambda m, a, b, c: m(a, b, c))(ours, nhwc(x), t, ctx)
  assert got.shape == (2, 16, 16, 4)
  np.testing.assert_allclose(nchw(got), want, atol=1e-4, rtol=0)
  assert np.abs(want).max() > 0.1  # the comparison is not between two near-zero tensors


def test_unet_odd_size_and_hooks():
  """A 12x12 input needs diffusers' upsample-to-skip-size path; the hooks change the output."""
  ref, ours = _pair("linear_per_block_heads")
  rs = np.random.RandomState(1)
  x = rs.randn(1, 8, 12, 12).astype(np.float32)
  ctx = rs.randn(1, 3, 24).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.tensor(x), torch.tensor([10]), torch.tensor(ctx)).sample.numpy()
  got = ours(jnp.asarray(nhwc(x)), 10, jnp.asarray(ctx))
  np.testing.assert_allclose(nchw(got), want, atol=1e-4, rtol=0)
  extra = ours(jnp.asarray(nhwc(x)), 10, jnp.asarray(ctx), extra_time_emb=jnp.ones((1, 128)))
  shifted = ours(jnp.asarray(nhwc(x)), 10, jnp.asarray(ctx), after_conv_in=lambda h: h + 1.0)
  assert np.abs(np.asarray(extra) - np.asarray(got)).max() > 1e-3
  assert np.abs(np.asarray(shifted) - np.asarray(got)).max() > 1e-3


def test_bf16_compute_keeps_fp32_params_and_stays_close():
  cfg = dict(UNET_CONFIGS["linear_per_block_heads"])
  full = UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))
  half = UNet2DConditionModel(
      cfg, dtype=jnp.bfloat16, remat=("resnet", "transformer"), rngs=nnx.Rngs(0)
  )
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(half, nnx.Param)))
  rs = np.random.RandomState(2)
  x, ctx = rs.randn(1, 16, 16, 8).astype(np.float32), rs.randn(1, 4, 24).astype(np.float32)
  a, b = full(x, 5, ctx), half(x, 5, ctx)
  assert b.dtype == jnp.bfloat16
  err = np.abs(np.asarray(a) - np.asarray(b, np.float32)).max() / np.abs(np.asarray(a)).max()
  assert err < 0.05
  # Rematerialisation changes memory, not values: gradients agree with the plain model's.
  grad = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x, 5, ctx).astype(jnp.float32) ** 2)))
  g_full = grad(full)
  remat32 = UNet2DConditionModel(cfg, remat=("resnet", "transformer"), rngs=nnx.Rngs(0))
  g_remat = grad(remat32)
  for u, v in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=1e-6)


def test_unknown_remat_kind_is_refused():
  with pytest.raises(ValueError, match="remat"):
    UNet2DConditionModel(UNET_CONFIGS["linear_per_block_heads"], remat=("mlp",), rngs=nnx.Rngs(0))


def test_noisy_skip_starts_as_the_plain_unet_and_adds_its_gain_times_the_input():
  """mre_noisy_skip: zero gain at the start (the same output as without it); a gain g makes the
  output the plain one plus g times the noisy input's channels."""
  configs = UNET_CONFIGS
  name = sorted(configs)[0]
  plain = UNet2DConditionModel(dict(configs[name]), rngs=nnx.Rngs(0))
  skip = UNet2DConditionModel({**configs[name], "mre_noisy_skip": True}, rngs=nnx.Rngs(0))
  rs = np.random.RandomState(2)
  x = jnp.asarray(rs.randn(2, 16, 16, 8), jnp.float32)
  ctx = jnp.asarray(rs.randn(2, 5, configs[name]["cross_attention_dim"]), jnp.float32)
  base = np.asarray(plain(x, jnp.array([3, 951]), ctx))
  np.testing.assert_allclose(np.asarray(skip(x, jnp.array([3, 951]), ctx)), base, atol=1e-6)
  skip.noisy_skip_gain.bias[...] = jnp.asarray([0.5, -1.0, 2.0, 0.0])
  got = np.asarray(skip(x, jnp.array([3, 951]), ctx))
  gain = np.asarray([0.5, -1.0, 2.0, 0.0])
  np.testing.assert_allclose(got, base + gain * np.asarray(x)[..., :4], atol=1e-5)


def test_pixel_head_starts_as_the_plain_unet_and_is_a_per_pixel_function_of_its_input():
  """mre_pixel_head: a zero output layer at the start (the same output as without it); once
  trained, changing one input pixel moves the head's output at that pixel only."""
  configs = UNET_CONFIGS
  name = sorted(configs)[0]
  plain = UNet2DConditionModel(dict(configs[name]), rngs=nnx.Rngs(0))
  head = UNet2DConditionModel({**configs[name], "mre_pixel_head": 8}, rngs=nnx.Rngs(0))
  rs = np.random.RandomState(3)
  x = jnp.asarray(rs.randn(2, 16, 16, 8), jnp.float32)
  ctx = jnp.asarray(rs.randn(2, 5, configs[name]["cross_attention_dim"]), jnp.float32)
  t = jnp.array([3, 951])
  base = np.asarray(plain(x, t, ctx))
  np.testing.assert_allclose(np.asarray(head(x, t, ctx)), base, atol=1e-6)

  head.pixel_head.fc_out.kernel[...] = jnp.asarray(rs.randn(8, 4), jnp.float32)
  with_head = np.asarray(head(x, t, ctx))
  assert np.abs(with_head - base).max() > 1e-2
  # The head's own contribution, with the U-Net's features held fixed, is per pixel: the head
  # applied to a copy of its input with one pixel changed differs at that pixel only.
  feats = jnp.asarray(rs.randn(2, 16, 16, head.config.block_out_channels[0] + 8), jnp.float32)
  emb = head.time_embed(t, 2)
  moved = feats.at[:, 5, 7, :].add(1.0)
  diff = np.abs(np.asarray(head.pixel_head(moved, emb) - head.pixel_head(feats, emb))).max(-1)
  assert diff[:, 5, 7].min() > 1e-4
  diff[:, 5, 7] = 0.0
  assert diff.max() == 0.0


def test_pixel_head_only_is_the_whole_output():
  """mre_pixel_head_only: no conv_out; the output is the head's (zero at the start), and a config
  asking for it without a head width is refused."""
  configs = UNET_CONFIGS
  name = sorted(configs)[0]
  only = UNet2DConditionModel(
      {**configs[name], "mre_pixel_head": 8, "mre_pixel_head_only": True}, rngs=nnx.Rngs(0)
  )
  assert not hasattr(only, "conv_out")
  rs = np.random.RandomState(4)
  x = jnp.asarray(rs.randn(2, 16, 16, 8), jnp.float32)
  ctx = jnp.asarray(rs.randn(2, 5, configs[name]["cross_attention_dim"]), jnp.float32)
  t = jnp.array([3, 951])
  np.testing.assert_array_equal(np.asarray(only(x, t, ctx)), 0.0)
  only.pixel_head.fc_out.bias[...] = jnp.asarray([1.0, 2.0, 3.0, 4.0])
  np.testing.assert_allclose(
      np.asarray(only(x, t, ctx)), np.broadcast_to([1, 2, 3, 4], (2, 16, 16, 4))
  )
  with pytest.raises(ConfigError, match="mre_pixel_head"):
    UNet2DConditionModel({**configs[name], "mre_pixel_head_only": True}, rngs=nnx.Rngs(0))


def test_pixel_head_input_scale_multiplies_the_pixel_channels_only():
  """mre_pixel_head_input_scale s: the same as scale 1 with the head's first-layer weights on the
  input pixel's channels multiplied by s (and those on the features unchanged)."""
  configs = UNET_CONFIGS
  name = sorted(configs)[0]
  cfg = {**configs[name], "mre_pixel_head": 8, "mre_pixel_head_only": True}
  one = UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))
  four = UNet2DConditionModel({**cfg, "mre_pixel_head_input_scale": 4.0}, rngs=nnx.Rngs(0))
  rs = np.random.RandomState(5)
  for m in (one, four):
    m.pixel_head.fc_out.kernel[...] = jnp.asarray(np.random.RandomState(6).randn(8, 4), jnp.float32)
  x = jnp.asarray(rs.randn(2, 16, 16, 8), jnp.float32)
  ctx = jnp.asarray(rs.randn(2, 5, configs[name]["cross_attention_dim"]), jnp.float32)
  t = jnp.array([3, 951])
  assert np.abs(np.asarray(one(x, t, ctx)) - np.asarray(four(x, t, ctx))).max() > 1e-3
  features = one.config.block_out_channels[0]
  kernel = one.pixel_head.fc1.kernel[...]
  one.pixel_head.fc1.kernel[...] = kernel.at[features:].multiply(4.0)
  np.testing.assert_allclose(np.asarray(one(x, t, ctx)), np.asarray(four(x, t, ctx)), atol=1e-5)


def test_pixel_head_fourier_features_extend_the_head_and_are_periodic_in_the_pixel():
  """mre_pixel_head_fourier k: the head also reads sin/cos(2^j pi x), j < k, of the input pixel.
  With their first-layer weights zero it is the head without them; with only theirs non-zero its
  output repeats when the pixel moves by 2 (the slowest period) and not by 1."""
  configs = UNET_CONFIGS
  name = sorted(configs)[0]
  cfg = {**configs[name], "mre_pixel_head": 8, "mre_pixel_head_only": True}
  plain = UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))
  fourier = UNet2DConditionModel({**cfg, "mre_pixel_head_fourier": 2}, rngs=nnx.Rngs(0))
  features = plain.config.block_out_channels[0]
  kernel = plain.pixel_head.fc1.kernel[...]
  assert fourier.pixel_head.fc1.kernel.shape[0] == kernel.shape[0] + 2 * 2 * 8
  with pytest.raises(ConfigError, match="mre_pixel_head_fourier"):
    UNet2DConditionModel({**configs[name], "mre_pixel_head_fourier": 2}, rngs=nnx.Rngs(0))
  out = jnp.asarray(np.random.RandomState(6).randn(8, 4), jnp.float32)
  for m in (plain, fourier):
    m.pixel_head.fc_out.kernel[...] = out
  fourier.pixel_head.fc1.kernel[...] = jnp.concatenate(
      [kernel, jnp.zeros((2 * 2 * 8, kernel.shape[1]))], axis=0
  )
  rs = np.random.RandomState(5)
  x = jnp.asarray(rs.randn(2, 16, 16, 8), jnp.float32)
  ctx = jnp.asarray(rs.randn(2, 5, configs[name]["cross_attention_dim"]), jnp.float32)
  t = jnp.array([3, 951])
  np.testing.assert_allclose(
      np.asarray(fourier(x, t, ctx)), np.asarray(plain(x, t, ctx)), atol=1e-6
  )
  only = np.zeros(fourier.pixel_head.fc1.kernel.shape, np.float32)
  only[features + 8 :] = rs.randn(2 * 2 * 8, kernel.shape[1])
  fourier.pixel_head.fc1.kernel[...] = jnp.asarray(only)
  a, b, c = (np.asarray(fourier(x + shift, t, ctx)) for shift in (0.0, 2.0, 1.0))
  np.testing.assert_allclose(b, a, atol=1e-4)
  assert np.abs(c - a).max() > 1e-2


def test_pixel_head_gate_multiplies_the_output_by_a_sigmoid_of_one_more_channel():
  """mre_pixel_head_gate: the head gives out_channels + 1 channels and the output is
  sigmoid(the last) times the others: zero at the start, the ungated head's output at a saturated
  open gate, zero at a saturated closed one, half of it at a zero gate channel."""
  configs = UNET_CONFIGS
  name = sorted(configs)[0]
  cfg = {**configs[name], "mre_pixel_head": 8, "mre_pixel_head_only": True}
  plain = UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))
  gated = UNet2DConditionModel({**cfg, "mre_pixel_head_gate": True}, rngs=nnx.Rngs(0))
  assert gated.pixel_head.fc_out.kernel.shape == (8, 5)
  with pytest.raises(ConfigError, match="mre_pixel_head_gate"):
    UNet2DConditionModel({**configs[name], "mre_pixel_head_gate": True}, rngs=nnx.Rngs(0))
  rs = np.random.RandomState(7)
  x = jnp.asarray(rs.randn(2, 16, 16, 8), jnp.float32)
  ctx = jnp.asarray(rs.randn(2, 5, configs[name]["cross_attention_dim"]), jnp.float32)
  t = jnp.array([3, 951])
  np.testing.assert_array_equal(np.asarray(gated(x, t, ctx)), 0.0)
  out = jnp.asarray(rs.randn(8, 4), jnp.float32)
  plain.pixel_head.fc_out.kernel[...] = out
  ungated = np.asarray(plain(x, t, ctx))
  for bias, share in ((30.0, 1.0), (-30.0, 0.0), (0.0, 0.5)):
    gated.pixel_head.fc_out.kernel[...] = jnp.concatenate([out, jnp.zeros((8, 1))], axis=1)
    gated.pixel_head.fc_out.bias[...] = jnp.asarray([0.0, 0.0, 0.0, 0.0, bias])
    np.testing.assert_allclose(np.asarray(gated(x, t, ctx)), share * ungated, atol=1e-5)


def test_pixel_head_text_attention_adds_a_per_pixel_attention_over_the_words():
  """mre_pixel_head_text_attention: at the start (output projection zero) the head equals the
  plain one; then its hidden layer adds out(softmax(q k^T / sqrt(d)) v) per pixel, as computed
  here by hand."""
  configs = UNET_CONFIGS
  name = sorted(configs)[0]
  cfg = {**configs[name], "mre_pixel_head": 8, "mre_pixel_head_only": True}
  plain = UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))
  attn = UNet2DConditionModel({**cfg, "mre_pixel_head_text_attention": 4}, rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="mre_pixel_head_text_attention"):
    UNet2DConditionModel({**configs[name], "mre_pixel_head_text_attention": 4}, rngs=nnx.Rngs(0))
  rs = np.random.RandomState(3)
  x = jnp.asarray(rs.randn(2, 16, 16, 8), jnp.float32)
  ctx = jnp.asarray(rs.randn(2, 5, configs[name]["cross_attention_dim"]), jnp.float32)
  t = jnp.array([3, 951])
  out = jnp.asarray(rs.randn(8, 4), jnp.float32)
  for model in (plain, attn):
    model.pixel_head.fc_out.kernel[...] = out
  np.testing.assert_allclose(np.asarray(attn(x, t, ctx)), np.asarray(plain(x, t, ctx)), atol=1e-6)
  head = attn.pixel_head
  head.to_out.kernel[...] = jnp.asarray(rs.randn(4, 8), jnp.float32)
  # The head's input and hidden layer, then the attention by hand (numpy, float64).
  captured = {}
  call = type(head).__call__

  def spy(self, inputs, emb, context=None):
    captured.update(inputs=np.asarray(inputs, np.float64), emb=np.asarray(emb, np.float64))
    return call(self, inputs, emb, context)

  type(head).__call__ = spy
  try:
    got = np.asarray(attn(x, t, ctx))
  finally:
    type(head).__call__ = call
  w = lambda layer: np.asarray(layer.kernel, np.float64)  # noqa: E731
  b = lambda layer: np.asarray(layer.bias, np.float64)  # noqa: E731
  silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
  h = silu(
      captured["inputs"] @ w(head.fc1)
      + b(head.fc1)
      + (silu(captured["emb"]) @ w(head.time) + b(head.time))[:, None, None, :]
  )
  c = np.asarray(ctx, np.float64)
  q, k, v = h @ w(head.to_q), c @ w(head.to_k), c @ w(head.to_v)
  logits = np.einsum("bhwd,btd->bhwt", q, k) / 2.0
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  h = h + np.einsum("bhwt,btd->bhwd", p, v) @ w(head.to_out) + b(head.to_out)
  want = silu(h @ w(head.fc2) + b(head.fc2)) @ w(head.fc_out) + b(head.fc_out)
  np.testing.assert_allclose(got, want, atol=1e-4)
  assert np.abs(got - np.asarray(plain(x, t, ctx))).max() > 1e-3


def test_self_condition_reads_an_estimate_in_extra_input_channels():
  """mre_self_condition: conv_in reads the latent channels of an x0 estimate after the usual input;
  no estimate means zeros; a plain U-Net refuses one."""
  configs = UNET_CONFIGS
  name = sorted(configs)[0]
  plain = UNet2DConditionModel(dict(configs[name]), rngs=nnx.Rngs(0))
  sc = UNet2DConditionModel({**configs[name], "mre_self_condition": True}, rngs=nnx.Rngs(0))
  assert sc.conv_in.kernel.shape[-2] == plain.conv_in.kernel.shape[-2] + 4
  rs = np.random.RandomState(4)
  x = jnp.asarray(rs.randn(2, 16, 16, 8), jnp.float32)
  estimate = jnp.asarray(rs.randn(2, 16, 16, 4), jnp.float32)
  ctx = jnp.asarray(rs.randn(2, 5, configs[name]["cross_attention_dim"]), jnp.float32)
  t = jnp.array([3, 951])
  none = np.asarray(sc(x, t, ctx))
  np.testing.assert_array_equal(none, np.asarray(sc(x, t, ctx, self_cond=jnp.zeros_like(estimate))))
  assert np.abs(np.asarray(sc(x, t, ctx, self_cond=estimate)) - none).max() > 1e-3
  # With the estimate's weights of conv_in at zero it is the plain U-Net with the same weights.
  sc.conv_in.kernel[...] = sc.conv_in.kernel[...].at[:, :, 8:, :].set(0.0)
  plain.conv_in.kernel[...] = sc.conv_in.kernel[...][:, :, :8, :]
  nnx.update(plain, nnx.state(sc, nnx.Not(nnx.PathContains("conv_in"))))
  np.testing.assert_allclose(
      np.asarray(sc(x, t, ctx, self_cond=estimate)), np.asarray(plain(x, t, ctx)), atol=1e-5
  )
  with pytest.raises(ValueError, match="self_cond"):
    plain(x, t, ctx, self_cond=estimate)
