"""Multi-reward conditioning (the paper's contribution), in the paper's form and the released form.

A reward is three perspectives (instruction following, detail preserving, generation quality), each a
score in [0, 5] and a failure text. The U-Net sees it in two places: in the latent space right after
`conv_in` (the feature map cross-attends to reward tokens) and added to the time embedding.

`RewardInputs.text` holds pooled CLIP features of the failure texts: [B, 3, D] for the paper form
(one text per perspective), [B, 1, D] for the released form (the three joined with "; ").
What a reward is (`RewardConfig`: slots, perfect and null rewards) is `mre.models.reward_config`;
reward dropout is `mre.diffusion.condition_dropout`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mre.models.layers import TimestepEmbedding, conv, group_norm, linear, sinusoidal_embedding
from mre.models.reward_config import RewardConfig, RewardInputs


def score_sinusoid(scores, dim, flip_sin_to_cos=True, freq_shift=0.0):
  """[B, 3] raw scores -> [B, 3, dim] sinusoids (float32), the release's `Timesteps(dim)` on each."""
  b, k = scores.shape
  return sinusoidal_embedding(scores.reshape(-1), dim, flip_sin_to_cos, freq_shift).reshape(
      b, k, dim
  )


# --- paper form -----------------------------------------------------------------------------------


class RewardTokens(nnx.Module):
  """c_k = concat(MLP(PE(s_k)), text_k) + E_type[k], for k = following, preserving, quality."""

  def __init__(self, cfg: RewardConfig, text_dim, flip_sin_to_cos, freq_shift, **kw):
    self.cfg, self.flip, self.shift = cfg, flip_sin_to_cos, freq_shift
    width = 0
    if cfg.use_scores:
      self.score_mlp = TimestepEmbedding(cfg.score_dim, cfg.score_dim, **kw)
      width += cfg.score_dim
    if cfg.use_texts:
      width += text_dim
    self.width = width
    self.type_embedding = nnx.Param(
        jax.random.normal(kw["rngs"].params(), (3, width), kw["param_dtype"]) * 0.02
    )

  def __call__(self, reward: RewardInputs, dtype):
    parts = []
    if self.cfg.use_scores:
      pe = score_sinusoid(reward.scores, self.cfg.score_dim, self.flip, self.shift)
      parts.append(self.score_mlp(pe.astype(dtype)))
    if self.cfg.use_texts:
      parts.append(reward.text.astype(dtype))
    return jnp.concatenate(parts, axis=-1) + self.type_embedding[...].astype(dtype)


class RewardEncoder(nnx.Module):
  """Latent-space injection: the feature map after conv_in attends to the reward tokens.

  GroupNorm -> 1x1 conv -> (H*W tokens) cross-attention to Linear(C_R) -> feed-forward -> 1x1 conv
  -> residual add. `proj_out` starts at zero, so the block starts as the identity.
  """

  def __init__(self, channels, token_dim, heads, groups, **kw):
    self.heads = heads
    self.norm = group_norm(channels, groups, 1e-6, **kw)
    self.proj_in = conv(channels, channels, 1, padding=0, **kw)
    self.token_proj = linear(token_dim, channels, **kw)
    self.attn_norm = nnx.LayerNorm(channels, use_fast_variance=False, **kw)
    self.to_q, self.to_k = linear(channels, channels, **kw), linear(channels, channels, **kw)
    self.to_v, self.to_out = linear(channels, channels, **kw), linear(channels, channels, **kw)
    self.ff_norm = nnx.LayerNorm(channels, use_fast_variance=False, **kw)
    self.ff_in, self.ff_out = linear(channels, 4 * channels, **kw), linear(
        4 * channels, channels, **kw
    )
    self.proj_out = conv(channels, channels, 1, padding=0, **kw)
    self.proj_out.kernel[...] = jnp.zeros_like(self.proj_out.kernel[...])

  def __call__(self, h, tokens):
    b, hh, ww, c = h.shape
    x = self.proj_in(self.norm(h)).reshape(b, hh * ww, c)
    ctx = self.token_proj(tokens.astype(x.dtype))
    split = lambda t: t.reshape(b, t.shape[1], self.heads, c // self.heads)
    q = self.to_q(self.attn_norm(x))
    att = jax.nn.dot_product_attention(
        split(q), split(self.to_k(ctx)), split(self.to_v(ctx)), scale=(c // self.heads) ** -0.5
    )
    x = x + self.to_out(att.reshape(b, hh * ww, c))
    x = x + self.ff_out(jax.nn.gelu(self.ff_in(self.ff_norm(x)), approximate=False))
    return h + self.proj_out(x.reshape(b, hh, ww, c)).astype(h.dtype)


class PaperReward(nnx.Module):
  """The paper's MRC module: reward tokens, the reward encoder, and the time-embedding projection."""

  def __init__(
      self,
      cfg: RewardConfig,
      channels,
      temb_dim,
      text_dim,
      groups,
      flip_sin_to_cos,
      freq_shift,
      **kw,
  ):
    self.cfg = cfg
    self.tokens = RewardTokens(cfg, text_dim, flip_sin_to_cos, freq_shift, **kw)
    if cfg.inject_latent:
      self.encoder = RewardEncoder(channels, self.tokens.width, cfg.heads, groups, **kw)
    if cfg.inject_unet:
      self.time_proj = linear(self.tokens.width, temb_dim, **kw)
      self.time_proj.kernel[...] = jnp.zeros_like(self.time_proj.kernel[...])

  def time_emb(self, tokens):
    return self.time_proj(tokens.mean(axis=1)) if self.cfg.inject_unet else None


# --- released form --------------------------------------------------------------------------------


class _BertSelfAttention(nnx.Module):

  def __init__(self, dim, **kw):
    self.query, self.key, self.value = (linear(dim, dim, **kw) for _ in range(3))


class _BertSelfOutput(nnx.Module):

  def __init__(self, dim, **kw):
    self.dense = linear(dim, dim, **kw)
    self.LayerNorm = nnx.LayerNorm(dim, epsilon=1e-12, use_fast_variance=False, **kw)  # pylint: disable=invalid-name


class _BertAttention(nnx.Module):

  def __init__(self, dim, **kw):
    setattr(self, "self", _BertSelfAttention(dim, **kw))
    self.output = _BertSelfOutput(dim, **kw)


class _Dense(nnx.Module):

  def __init__(self, din, dout, **kw):
    self.dense = linear(din, dout, **kw)


class BertCrossLayer(nnx.Module):
  """The release's `ca`: one BERT layer whose queries are pixels and keys/values reward tokens."""

  def __init__(self, dim, heads, dropout, **kw):
    rngs = kw["rngs"]
    self.heads = heads
    self.attention = _BertAttention(dim, **kw)
    self.hidden_intermediate = _Dense(dim, dim, **kw)
    self.output = _BertSelfOutput(dim, **kw)  # `ca.output`: dense + dropout + residual + LayerNorm
    # Off until `model.train()`: inference code that forgets `eval()` must not drop out.
    self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs)

  def __call__(self, x, ctx):
    b, t, c = x.shape
    sa = getattr(self.attention, "self")
    split = lambda y: y.reshape(b, y.shape[1], self.heads, c // self.heads)
    q, k, v = split(sa.query(x)), split(sa.key(ctx)), split(sa.value(ctx))
    # Written out rather than jax.nn.dot_product_attention: the release drops out attention
    # probabilities, and with two keys there is no memory to save.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (c // self.heads) ** -0.5
    probs = self.dropout(jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype))
    att = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, c)
    out = self.attention.output
    att = out.LayerNorm(self.dropout(out.dense(att)) + x)
    inter = jax.nn.gelu(self.hidden_intermediate.dense(att), approximate=False)
    return self.output.LayerNorm(self.dropout(self.output.dense(inter)) + att)


class ProjDeal(nnx.Module):
  """The release's `proj_deal`: GroupNorm and the 1x1 convs around `ca`."""

  def __init__(self, channels, groups, **kw):
    self.norm = group_norm(channels, groups, 1e-6, **kw)
    self.proj_in = conv(channels, channels, 1, padding=0, **kw)
    self.proj_out = conv(channels, channels, 1, padding=0, **kw)
