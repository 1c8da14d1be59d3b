"""The U-Net conditioned on multi-reward (paper or released form), and how to make and load one."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mre.models import weights
from mre.models.config import UNetConfig, read_json
from mre.models.layers import TimestepEmbedding, linear
from mre.models.reward import (BertCrossLayer, PaperReward, ProjDeal, RewardConfig, RewardInputs,
                               score_sinusoid)
from mre.models.unet import UNet2DConditionModel

CONFIG_KEY = "mre_reward"  # where our exported config.json records the reward settings
TEXT_DIM_KEY = "mre_reward_text_dim"


class RewardUNet(UNet2DConditionModel):
  """`__call__(sample, timesteps, context, *, reward: RewardInputs)`; a UNet2DConditionModel else.

  Released-form modules sit at the top level under the release's names (`add_embedding`, `ca`, ...)
  so that its state dict imports and exports unchanged; the paper form lives under `reward.*`.
  """

  def __init__(self, config, reward: RewardConfig, *, text_dim=None, dtype=jnp.float32,
               param_dtype=jnp.float32, remat=(), rngs: nnx.Rngs):
    config = config if isinstance(config, UNetConfig) else UNetConfig.from_dict(config)
    if reward.form == "released" and config.addition_embed_type is not None:
      # The release ignores `addition_embed_type`; its `add_embedding` is the score embedding.
      config = dataclasses.replace(config, addition_embed_type=None)
    super().__init__(config, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
    cfg, r = self.config, reward
    self.reward_config = r
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ch0, temb = cfg.block_out_channels[0], 4 * cfg.block_out_channels[0]
    text_dim = text_dim or cfg.cross_attention_dim  # CLIP's pooled width = its hidden width
    self.text_dim = text_dim
    if r.form == "paper":
      self.reward = PaperReward(r, ch0, temb, text_dim, cfg.norm_num_groups, cfg.flip_sin_to_cos,
                                cfg.freq_shift, **kw)
      return
    pe = 3 * r.score_dim
    if r.use_scores and r.inject_unet:
      self.add_embedding = TimestepEmbedding(pe, temb, **kw)
    if r.use_scores and r.inject_latent:
      self.add_embedding2 = TimestepEmbedding(pe, ch0, **kw)
    if r.use_texts and r.inject_unet:
      self.text_linear2 = linear(text_dim, temb, **kw)
    if r.use_texts and r.inject_latent:
      self.text_linear = linear(text_dim, ch0, **kw)
    if r.inject_latent:
      self.proj_deal = ProjDeal(ch0, cfg.norm_num_groups, **kw)
      self.ca = BertCrossLayer(ch0, r.heads, r.attn_dropout, **kw)

  def reward_injections(self, reward: RewardInputs):
    """(extra time embedding or None, function applied after conv_in or None)."""
    r, cfg = self.reward_config, self.config
    if reward.text.shape[1] != r.text_slots:
      raise ValueError(f"{r.form} reward form takes {r.text_slots} text feature(s) per sample, "
                       f"got reward.text of shape {reward.text.shape}")
    if r.form == "paper":
      tokens = self.reward.tokens(reward, self.dtype)
      after = (lambda h: self.reward.encoder(h, tokens)) if r.inject_latent else None
      return self.reward.time_emb(tokens), after
    pe = score_sinusoid(reward.scores.astype(jnp.float32), r.score_dim, cfg.flip_sin_to_cos,
                        cfg.freq_shift).reshape(reward.scores.shape[0], -1).astype(self.dtype)
    text = reward.text[:, 0].astype(self.dtype)
    extra, tokens = None, []
    if r.inject_unet:
      parts = ([self.add_embedding(pe)] if r.use_scores else []) + \
              ([self.text_linear2(text)] if r.use_texts else [])
      extra = sum(parts[1:], parts[0])
    if r.inject_latent:
      tokens = ([self.add_embedding2(pe)] if r.use_scores else []) + \
               ([self.text_linear(text)] if r.use_texts else [])
    return extra, (self._released_latent(jnp.stack(tokens, axis=1)) if tokens else None)

  def _released_latent(self, tokens):
    def apply(h):
      b, hh, ww, c = h.shape
      x = self.proj_deal.proj_in(self.proj_deal.norm(h)).reshape(b, hh * ww, c)
      x = self.ca(x, tokens.astype(x.dtype))
      return h + self.proj_deal.proj_out(x.reshape(b, hh, ww, c)).astype(h.dtype)
    return apply

  def __call__(self, sample, timesteps, context, *, reward: RewardInputs):
    extra, after = self.reward_injections(reward)
    return super().__call__(sample, timesteps, context, extra_time_emb=extra, after_conv_in=after)


# --- making and loading ---------------------------------------------------------------------------

def widen_conv_in(tensors: dict, in_channels: int = 8) -> dict:
  """SD 1.5 -> InstructPix2Pix: `conv_in` takes [noisy latent | image latent]; new inputs start at 0."""
  w = tensors["conv_in.weight"]
  if w.shape[1] >= in_channels:
    raise ValueError(f"conv_in already has {w.shape[1]} input channels (asked for {in_channels})")
  pad = np.zeros((w.shape[0], in_channels - w.shape[1]) + w.shape[2:], w.dtype)
  return {**tensors, "conv_in.weight": np.concatenate([w, pad], axis=1)}


def ip2p_unet_from_sd15(folder: str, *, in_channels=8, dtype=jnp.float32, param_dtype=jnp.float32,
                        remat=()):
  """The stage-1 starting point: an SD 1.5 `unet/` folder with `conv_in` widened to 8 channels."""
  raw = {**read_json(folder), "in_channels": in_channels}
  unet = nnx.eval_shape(lambda: UNet2DConditionModel(raw, dtype=dtype, param_dtype=param_dtype,
                                                     remat=remat, rngs=nnx.Rngs(0)))
  weights.load_state_dict(unet, widen_conv_in(weights.read_state_dict(folder), in_channels),
                          where=f"SD U-Net in {folder}")
  return weights.materialize_non_params(unet)


def reward_unet_from_stage1(stage1: UNet2DConditionModel, reward: RewardConfig, *, seed=0,
                            text_dim=None, dtype=None, param_dtype=jnp.float32, remat=()):
  """Stage 2's starting point: every stage-1 U-Net weight, plus freshly initialised reward modules."""
  model = RewardUNet(stage1.config, reward, text_dim=text_dim, dtype=dtype or stage1.dtype,
                     param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(seed))
  nnx.update(model, nnx.state(stage1, nnx.Param))
  return model


def has_reward(tensors: dict, cfg: dict) -> bool:
  # `add_embedding.linear_1`: the release's score embedding; a plain U-Net with
  # addition_embed_type "text" has an `add_embedding` too (norm1, pool, proj, norm2).
  released = ("add_embedding.linear_", "add_embedding2.", "text_linear", "proj_deal.")
  return CONFIG_KEY in cfg or any(k.startswith(released) for k in tensors)


def reward_config_of(tensors: dict, cfg: dict) -> RewardConfig:
  """The reward settings of a U-Net checkpoint: recorded by us, or inferred from released names."""
  if CONFIG_KEY in cfg:
    return RewardConfig(**cfg[CONFIG_KEY])
  has = lambda prefix: any(k.startswith(prefix) for k in tensors)
  if not (has("add_embedding.linear_") or has("text_linear") or has("proj_deal.")):
    raise ValueError("this U-Net checkpoint has no reward modules (neither our `mre_reward` "
                     "config entry nor the released `add_embedding`/`proj_deal`/`ca` tensors)")
  return RewardConfig(form="released", use_scores=has("add_embedding.linear_"),
                      use_texts=has("text_linear"), inject_latent=has("proj_deal."),
                      inject_unet=has("add_embedding.linear_") or has("text_linear2."))


def load_reward_unet(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, remat=(),
                     tensors=None):
  """A reward U-Net from a diffusers-format `unet/` folder: ours, or the released stage-2 one."""
  raw = read_json(folder)
  tensors = weights.read_state_dict(folder) if tensors is None else tensors
  reward = reward_config_of(tensors, raw)
  text_dim = None
  for name in ("text_linear.weight", "text_linear2.weight"):
    if name in tensors:
      text_dim = tensors[name].shape[1]
  text_dim = raw.get(TEXT_DIM_KEY, text_dim)
  cfg = UNetConfig.from_dict(raw)
  model = nnx.eval_shape(lambda: RewardUNet(cfg, reward, text_dim=text_dim, dtype=dtype,
                                            param_dtype=param_dtype, remat=remat,
                                            rngs=nnx.Rngs(0)))
  weights.load_state_dict(model, tensors, where=f"reward U-Net in {folder}")
  return weights.materialize_non_params(model)


def reward_unet_from_config(raw: dict, **kw) -> RewardUNet:
  """A (randomly initialised) RewardUNet from a config dict written by `export_config`."""
  return RewardUNet(raw, RewardConfig(**raw[CONFIG_KEY]), text_dim=raw.get(TEXT_DIM_KEY), **kw)


def export_config(model: RewardUNet) -> dict:
  """config.json content: the U-Net's, plus our reward settings under `mre_reward`.

  A released-form model keeps the release's tensor names, so the public code loads its weights;
  the extra keys are ignored by diffusers.
  """
  raw = dict(model.config.raw)
  raw[CONFIG_KEY] = dataclasses.asdict(model.reward_config)
  raw[TEXT_DIM_KEY] = model.text_dim
  return raw
