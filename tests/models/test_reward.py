"""Multi-reward conditioning: zero-init identity, learning to use the reward, and the released form."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mre.model_io import safetensors_io
from mre.model_io.diffusers_folder import load_unet, save_unet, widen_conv_in
from mre.model_io.reward_layout import load_reward_unet
from mre.diffusion.condition_dropout import drop_rewards
from mre.models.reward_config import NULL_SCORE, RewardConfig, RewardInputs
from mre.models.reward_unet import RewardUNet, reward_unet_from_stage1
from mre.models.unet import UNet2DConditionModel
from tests.reference import UNET_CONFIGS, nchw, nhwc, randomize, torch

CFG = UNET_CONFIGS["sd15_like"]  # block_out (16, 32, 32), cross_attention_dim 32


def _inputs(seed, batch=2, slots=3, text_dim=32):
  rs = np.random.RandomState(seed)
  return (
      jnp.asarray(rs.randn(batch, 16, 16, 8), jnp.float32),
      jnp.asarray([5, 700][:batch]),
      jnp.asarray(rs.randn(batch, 7, 32), jnp.float32),
      RewardInputs(
          jnp.asarray(rs.uniform(0, 5, (batch, 3)), jnp.float32),
          jnp.asarray(rs.randn(batch, slots, text_dim), jnp.float32),
      ),
  )


@pytest.fixture(scope="module")
def stage1():
  return UNet2DConditionModel(CFG, rngs=nnx.Rngs(3))


def test_paper_form_starts_as_the_stage1_model(stage1):
  model = reward_unet_from_stage1(stage1, RewardConfig(form="paper"), seed=1)
  x, t, ctx, reward = _inputs(0)
  want = stage1(x, t, ctx)
  for scores in ([0.0, 0.0, 0.0], [5.0, 5.0, 5.0], [1.5, 4.0, 2.5]):
    r = reward._replace(scores=jnp.broadcast_to(jnp.asarray(scores), (2, 3)))
    np.testing.assert_array_equal(np.asarray(model(x, t, ctx, reward=r)), np.asarray(want))


@pytest.mark.parametrize("form", ["paper", "released"])
def test_training_makes_the_output_depend_on_the_reward(stage1, form):
  model = reward_unet_from_stage1(stage1, RewardConfig(form=form, attn_dropout=0.0), seed=2)
  slots = 3 if form == "paper" else 1
  x, t, ctx, reward = _inputs(1, slots=slots)
  target = jnp.asarray(np.random.RandomState(9).randn(2, 16, 16, 4), jnp.float32)
  opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, reward):
    loss_fn = lambda m: jnp.mean(
        (m(x, t, ctx, reward=reward) - target * reward.scores[:, :1, None, None]) ** 2
    )
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss, grads

  for i in range(4):
    _, grads = step(model, opt, reward._replace(scores=reward.scores + i))
  reward_grads = {
      k: v
      for k, v in nnx.to_flat_state(grads)
      if k[0]
      in (
          "reward",
          "add_embedding",
          "add_embedding2",
          "text_linear",
          "text_linear2",
          "proj_deal",
          "ca",
      )
  }
  assert reward_grads, "no reward parameters found"
  dead = [k for k, v in reward_grads.items() if not np.any(np.asarray(v.get_value()))]
  assert not dead, f"no gradient reached {dead}"
  low = model(x, t, ctx, reward=reward._replace(scores=jnp.ones((2, 3))))
  high = model(x, t, ctx, reward=reward._replace(scores=jnp.full((2, 3), 5.0)))
  assert float(jnp.abs(low - high).max()) > 1e-3


def test_reward_dropout_replaces_whole_rewards():
  _, _, _, reward = _inputs(2, batch=2)
  null = RewardInputs(jnp.full((1, 3), NULL_SCORE), jnp.zeros((1, 3, 32)))
  assert drop_rewards(jax.random.key(0), reward, null, 0.0) is reward
  out = drop_rewards(jax.random.key(0), reward, null, 0.999)
  np.testing.assert_array_equal(np.asarray(out.scores), NULL_SCORE)
  np.testing.assert_array_equal(np.asarray(out.text), 0.0)


def test_ablation_switches_build_the_right_modules(stage1):
  only_scores = RewardUNet(CFG, RewardConfig(form="released", use_texts=False), rngs=nnx.Rngs(0))
  assert not hasattr(only_scores, "text_linear") and hasattr(only_scores, "add_embedding")
  latent_only = RewardUNet(CFG, RewardConfig(form="paper", inject_unet=False), rngs=nnx.Rngs(0))
  assert not hasattr(latent_only.reward, "time_proj")
  x, t, ctx, reward = _inputs(3, slots=1)
  assert only_scores(x, t, ctx, reward=reward).shape == (2, 16, 16, 4)
  with pytest.raises(ValueError, match="needs scores, texts, or both"):
    RewardConfig(use_scores=False, use_texts=False)
  with pytest.raises(ValueError, match="takes 3 text feature"):
    latent_only(x, t, ctx, reward=reward)


def test_widen_conv_in_keeps_old_channels_and_zeroes_new():
  w = np.random.RandomState(0).randn(16, 4, 3, 3).astype(np.float32)
  out = widen_conv_in({"conv_in.weight": w}, 8)["conv_in.weight"]
  assert out.shape == (16, 8, 3, 3)
  np.testing.assert_array_equal(out[:, :4], w)
  np.testing.assert_array_equal(out[:, 4:], 0)


# --- the released form against a PyTorch reference written from docs/released_reward_form.md ------


class _Fn(torch.nn.Module):
  """A function as a torch module, so it can replace a U-Net child for the reference run."""

  def __init__(self, fn):
    super().__init__()
    self.fn = fn

  def forward(self, *args):
    return self.fn(*args)


def _released_reference(unet):
  """The release's extra modules, as PyTorch modules with its names, patched into a diffusers U-Net."""
  from diffusers.models.embeddings import TimestepEmbedding, Timesteps

  nn = torch.nn
  ch0, temb, text_dim = 16, 64, 32

  class Lin(nn.Module):

    def __init__(self, d):
      super().__init__()
      self.dense = nn.Linear(d, d)

  class Out(Lin):

    def __init__(self, d):
      super().__init__(d)
      self.LayerNorm = nn.LayerNorm(d, eps=1e-12)

  class Ca(nn.Module):

    def __init__(self, d, heads=8):
      super().__init__()
      self.heads = heads
      self.attention = nn.Module()
      self.attention.self = nn.Module()
      for n in ("query", "key", "value"):
        setattr(self.attention.self, n, nn.Linear(d, d))
      self.attention.output = Out(d)
      self.hidden_intermediate = Lin(d)
      self.output = Out(d)

    def forward(self, x, ctx):
      b, t, d = x.shape
      sa = self.attention.self
      sp = lambda y: y.view(b, y.shape[1], self.heads, d // self.heads).transpose(1, 2)
      q, k, v = sp(sa.query(x)), sp(sa.key(ctx)), sp(sa.value(ctx))
      probs = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
      a = (probs @ v).transpose(1, 2).reshape(b, t, d)
      a = self.attention.output.LayerNorm(self.attention.output.dense(a) + x)
      i = torch.nn.functional.gelu(self.hidden_intermediate.dense(a))
      return self.output.LayerNorm(self.output.dense(i) + a)

  extra = nn.Module()
  extra.add_embedding = TimestepEmbedding(768, temb)
  extra.add_embedding2 = TimestepEmbedding(768, ch0)
  extra.text_linear = nn.Linear(text_dim, ch0)
  extra.text_linear2 = nn.Linear(text_dim, temb)
  extra.proj_deal = nn.Module()
  extra.proj_deal.norm = nn.GroupNorm(8, ch0, eps=1e-6)
  extra.proj_deal.proj_in = nn.Conv2d(ch0, ch0, 1)
  extra.proj_deal.proj_out = nn.Conv2d(ch0, ch0, 1)
  extra.ca = Ca(ch0)
  randomize(extra, 11, scale=0.1)
  sinus = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)

  def forward(x, t, ctx, scores, text):
    pe = torch.cat([sinus(scores[:, k]) for k in range(3)], dim=-1)
    add = extra.add_embedding(pe) + extra.text_linear2(text)
    tokens = torch.stack([extra.add_embedding2(pe), extra.text_linear(text)], dim=1)
    conv_in, time_embedding = unet.conv_in, unet.time_embedding

    def conv_hook(inp):
      h = conv_in(inp)
      b, c, hh, ww = h.shape
      r = extra.proj_deal.proj_in(extra.proj_deal.norm(h)).flatten(2).transpose(1, 2)
      r = extra.ca(r, tokens).transpose(1, 2).reshape(b, c, hh, ww)
      return h + extra.proj_deal.proj_out(r)

    unet.conv_in = _Fn(conv_hook)
    unet.time_embedding = _Fn(lambda e, *a: time_embedding(e) + add)
    try:
      return unet(x, t, ctx).sample
    finally:
      unet.conv_in, unet.time_embedding = conv_in, time_embedding

  return extra, forward


def test_released_checkpoint_imports_runs_and_exports_exactly(tmp_path):
  from diffusers import UNet2DConditionModel as TorchUNet

  torch.manual_seed(0)
  tunet = randomize(TorchUNet(**CFG), 12)
  extra, forward = _released_reference(tunet)
  folder = str(tmp_path / "unet")
  tunet.save_pretrained(folder)
  sd = safetensors_io.read_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  sd.update({k: v.numpy() for k, v in extra.state_dict().items()})
  safetensors_io.write_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"), sd)

  model = load_reward_unet(folder)
  assert model.reward_config.form == "released"
  model.eval()  # no attention dropout at inference
  rs = np.random.RandomState(4)
  x = rs.randn(2, 8, 16, 16).astype(np.float32)
  ctx, text = rs.randn(2, 7, 32).astype(np.float32), rs.randn(2, 32).astype(np.float32)
  scores, t = np.array([[5, 5, 5], [1.5, 3.0, 0.0]], np.float32), np.array([20, 900])
  with torch.no_grad():
    want = forward(
        torch.tensor(x),
        torch.tensor(t),
        torch.tensor(ctx),
        torch.tensor(scores),
        torch.tensor(text),
    ).numpy()
  got = model(nhwc(x), t, ctx, reward=RewardInputs(jnp.asarray(scores), jnp.asarray(text)[:, None]))
  np.testing.assert_allclose(nchw(got), want, atol=1e-4, rtol=0)

  save_unet(model, str(tmp_path / "again"))
  back = safetensors_io.read_safetensors(
      str(tmp_path / "again" / "diffusion_pytorch_model.safetensors")
  )
  assert back.keys() == sd.keys()
  assert all(back[k].tobytes() == sd[k].astype(np.float32).tobytes() for k in sd)

  del sd["ca.attention.output.LayerNorm.bias"]
  safetensors_io.write_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"), sd)
  with pytest.raises(
      safetensors_io.WeightsError, match="missing tensors: ca.attention.output.LayerNorm.bias"
  ):
    load_reward_unet(folder)


def test_paper_form_export_round_trip(tmp_path, stage1):
  model = reward_unet_from_stage1(stage1, RewardConfig(form="paper", use_texts=False), seed=5)
  save_unet(model, str(tmp_path / "u"))
  back = load_unet(str(tmp_path / "u"))  # the generic loader recognises a reward U-Net
  assert back.reward_config == model.reward_config
  x, t, ctx, reward = _inputs(6)
  np.testing.assert_array_equal(
      np.asarray(back(x, t, ctx, reward=reward)), np.asarray(model(x, t, ctx, reward=reward))
  )


def test_sd15_unet_widened_for_instruct_pix2pix_ignores_the_image_at_first(tmp_path):
  """conv_in 4 -> 8 channels with zero new weights: the stage-1 start equals SD 1.5 exactly."""
  from diffusers import UNet2DConditionModel as TorchUNet
  from mre.model_io.diffusers_folder import ip2p_unet_from_sd15

  cfg = {**CFG, "in_channels": 4}
  torch.manual_seed(0)
  sd = randomize(TorchUNet(**cfg), 13)
  sd.save_pretrained(str(tmp_path / "sd_unet"))
  unet = ip2p_unet_from_sd15(str(tmp_path / "sd_unet"))
  assert unet.config.in_channels == 8
  rs = np.random.RandomState(7)
  x, image = rs.randn(1, 4, 16, 16).astype(np.float32), rs.randn(1, 4, 16, 16).astype(np.float32)
  ctx = rs.randn(1, 7, 32).astype(np.float32)
  with torch.no_grad():
    want = sd(torch.tensor(x), torch.tensor([300]), torch.tensor(ctx)).sample.numpy()
  got = unet(np.concatenate([nhwc(x), nhwc(image)], -1), 300, ctx)
  np.testing.assert_allclose(nchw(got), want, atol=1e-4, rtol=0)
