"""The U-Net conditioned on multi-reward (paper or released form), and stage 2's starting point.

Its checkpoint layouts (ours and the released one) are read and written by `mre.model_io.reward_layout`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from mre.models.config import UNetConfig
from mre.models.layers import TimestepEmbedding, linear
from mre.models.reward import BertCrossLayer, PaperReward, ProjDeal, score_sinusoid
from mre.models.reward_config import RewardConfig, RewardInputs
from mre.models.unet import UNet2DConditionModel


class RewardUNet(UNet2DConditionModel):
  """`__call__(sample, timesteps, context, *, reward: RewardInputs)`; a UNet2DConditionModel else.

  Released-form modules sit at the top level under the release's names (`add_embedding`, `ca`, ...)
  so that its state dict imports and exports unchanged; the paper form lives under `reward.*`.
  """

  def __init__(
      self,
      config,
      reward: RewardConfig,
      *,
      text_dim=None,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      remat=(),
      rngs: nnx.Rngs,
  ):
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
      self.reward = PaperReward(
          r, ch0, temb, text_dim, cfg.norm_num_groups, cfg.flip_sin_to_cos, cfg.freq_shift, **kw
      )
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
      raise ValueError(
          f"{r.form} reward form takes {r.text_slots} text feature(s) per sample, "
          f"got reward.text of shape {reward.text.shape}"
      )
    if r.form == "paper":
      tokens = self.reward.tokens(reward, self.dtype)
      after = (lambda h: self.reward.encoder(h, tokens)) if r.inject_latent else None
      return self.reward.time_emb(tokens), after
    pe = (
        score_sinusoid(
            reward.scores.astype(jnp.float32), r.score_dim, cfg.flip_sin_to_cos, cfg.freq_shift
        )
        .reshape(reward.scores.shape[0], -1)
        .astype(self.dtype)
    )
    text = reward.text[:, 0].astype(self.dtype)
    extra, tokens = None, []
    if r.inject_unet:
      parts = ([self.add_embedding(pe)] if r.use_scores else []) + (
          [self.text_linear2(text)] if r.use_texts else []
      )
      extra = sum(parts[1:], parts[0])
    if r.inject_latent:
      tokens = ([self.add_embedding2(pe)] if r.use_scores else []) + (
          [self.text_linear(text)] if r.use_texts else []
      )
    return extra, (self._released_latent(jnp.stack(tokens, axis=1)) if tokens else None)

  def _released_latent(self, tokens):
    def apply(h):
      b, hh, ww, c = h.shape
      x = self.proj_deal.proj_in(self.proj_deal.norm(h)).reshape(b, hh * ww, c)
      x = self.ca(x, tokens.astype(x.dtype))
      return h + self.proj_deal.proj_out(x.reshape(b, hh, ww, c)).astype(h.dtype)

    return apply

  def __call__(self, sample, timesteps, context, *, reward: RewardInputs, self_cond=None):
    extra, after = self.reward_injections(reward)
    return super().__call__(
        sample, timesteps, context, extra_time_emb=extra, after_conv_in=after, self_cond=self_cond
    )


# --- stage 2's starting point ---------------------------------------------------------------------


def reward_unet_from_stage1(
    stage1: UNet2DConditionModel,
    reward: RewardConfig,
    *,
    seed=0,
    text_dim=None,
    dtype=None,
    param_dtype=jnp.float32,
    remat=(),
):
  """Stage 2's starting point: every stage-1 U-Net weight, plus freshly initialised reward modules."""
  if reward.form == "released" and stage1.config.addition_embed_type is not None:
    # The release's `add_embedding` is its score embedding: the stage-1 one would be lost.
    raise ValueError(
        f"the released reward form cannot start from a U-Net with addition_embed_type="
        f"{stage1.config.addition_embed_type!r} (its add_embedding is the score embedding); use "
        "model.reward.form=paper, or a stage-1 U-Net without it"
    )
  model = RewardUNet(
      stage1.config,
      reward,
      text_dim=text_dim,
      dtype=dtype or stage1.dtype,
      param_dtype=param_dtype,
      remat=remat,
      rngs=nnx.Rngs(seed),
  )
  nnx.update(model, nnx.state(stage1, nnx.Param))
  return model
