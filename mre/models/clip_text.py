"""CLIP text transformer (transformers' `CLIPTextModel`): causal, pre-LayerNorm, quick-GELU.

Returns the last hidden state (the U-Net's cross-attention context) and the pooled feature at the
end-of-text token (what the reward texts are encoded to).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mre.models.config import CLIPTextConfig
from mre.models.layers import linear

_ACTS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class CLIPAttention(nnx.Module):

  def __init__(self, dim, heads, **kw):
    self.heads, self.head_dim = heads, dim // heads
    self.q_proj, self.k_proj = linear(dim, dim, **kw), linear(dim, dim, **kw)
    self.v_proj, self.out_proj = linear(dim, dim, **kw), linear(dim, dim, **kw)

  def __call__(self, x, mask):
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.heads, self.head_dim)
    out = jax.nn.dot_product_attention(
        split(self.q_proj(x)),
        split(self.k_proj(x)),
        split(self.v_proj(x)),
        mask=mask,
        scale=self.head_dim**-0.5,
    )
    return self.out_proj(out.reshape(b, t, d))


class CLIPMLP(nnx.Module):

  def __init__(self, dim, hidden, act, **kw):
    self.fc1, self.fc2, self.act = linear(dim, hidden, **kw), linear(hidden, dim, **kw), _ACTS[act]

  def __call__(self, x):
    return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):

  def __init__(self, cfg: CLIPTextConfig, **kw):
    ln = lambda: nnx.LayerNorm(
        cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_fast_variance=False, **kw
    )
    self.layer_norm1, self.layer_norm2 = ln(), ln()
    self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_attention_heads, **kw)
    self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, **kw)

  def __call__(self, x, mask):
    x = x + self.self_attn(self.layer_norm1(x), mask)
    return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nnx.Module):

  def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **kw)
    self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, **kw)

  def __call__(self, ids):
    return self.token_embedding(ids) + self.position_embedding(jnp.arange(ids.shape[1]))[None]


class _Encoder(nnx.Module):

  def __init__(self, cfg, **kw):
    self.layers = nnx.List([CLIPEncoderLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])


class _TextTransformer(nnx.Module):

  def __init__(self, cfg, **kw):
    self.embeddings = _Embeddings(cfg, **kw)
    self.encoder = _Encoder(cfg, **kw)
    self.final_layer_norm = nnx.LayerNorm(
        cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_fast_variance=False, **kw
    )


class CLIPTextModel(nnx.Module):
  """`__call__(input_ids [B, T], attention_mask=None) -> (last_hidden [B,T,D], pooled [B,D])`."""

  def __init__(
      self,
      config: CLIPTextConfig | dict,
      *,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    cfg = config if isinstance(config, CLIPTextConfig) else CLIPTextConfig.from_dict(config)
    self.config = cfg
    self.text_model = _TextTransformer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, input_ids, attention_mask=None):
    tm = self.text_model
    t = input_ids.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, None, :]
    x = tm.embeddings(input_ids)
    for layer in tm.encoder.layers:
      x = layer(x, mask)
    x = tm.final_layer_norm(x)
    # Configs saved before transformers fixed the EOS id (eos_token_id == 2) pool at the largest
    # token id, which is the EOS token of the CLIP vocabulary; later ones look for the EOS id.
    if self.config.eos_token_id == 2:
      eos = jnp.argmax(input_ids, axis=-1)
    else:
      eos = jnp.argmax((input_ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)
    pooled = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]
    return x, pooled
