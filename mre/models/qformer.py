"""The BLIP-2 Q-Former (transformers' `Blip2QFormerModel` with its learned query tokens).

Learned queries [1, Q, H] -> LayerNorm -> BERT layers: self-attention over the queries,
cross-attention to the encoder states on every `cross_attention_frequency`-th layer (0, f, 2f, ...),
then the query feed-forward (`intermediate_query` / `output_query`); each block ends in
dense -> dropout -> LayerNorm(x + residual). Without text input: `use_qformer_text_input` is refused.
Attribute names are transformers' (`layernorm`, `encoder.layer.i.attention.attention.query`, ...);
LAVIS checkpoints (`embeddings.LayerNorm`, `attention.self.query`) are renamed on import by
`mre.model_io.qformer_weights`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mre.models.config import ConfigError, refuse, require
from mre.models.layers import maybe_remat

REMAT_CHOICES = ("layer",)
_ACTS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  encoder_hidden_size: int
  num_query_tokens: int = 32  # Blip2Config's default; SmartEdit has 77
  cross_attention_frequency: int = 2
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  initializer_range: float = 0.02
  max_position_embeddings: int = 512  # only for the LAVIS export's `position_ids` buffer
  raw: Any = dataclasses.field(default=None, compare=False, repr=False)

  def has_cross_attention(self, layer: int) -> bool:
    return layer % self.cross_attention_frequency == 0

  @classmethod
  def from_dict(cls, cfg: dict) -> "QFormerConfig":
    """A `Blip2QFormerConfig` dict (plus `num_query_tokens`), or a `Blip2Config` one."""
    where = "Blip2QFormerModel"
    if "qformer_config" in cfg:
      cfg = dict(cfg["qformer_config"], num_query_tokens=cfg.get("num_query_tokens", 32))
    require(
        cfg,
        [
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "encoder_hidden_size",
        ],
        where,
    )
    refuse(cfg, "use_qformer_text_input", (False,), where, False)
    refuse(cfg, "position_embedding_type", ("absolute",), where, "absolute")
    act = refuse(cfg, "hidden_act", tuple(_ACTS), where, "gelu")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
      raise ConfigError(
          f"{where}: hidden_size {cfg['hidden_size']} does not split into "
          f"{cfg['num_attention_heads']} heads"
      )
    freq = cfg.get("cross_attention_frequency", 2)
    if not isinstance(freq, int) or freq < 1:
      raise ConfigError(f"{where}: cross_attention_frequency={freq!r} must be a positive integer")
    return cls(
        hidden_size=cfg["hidden_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        intermediate_size=cfg["intermediate_size"],
        encoder_hidden_size=cfg["encoder_hidden_size"],
        num_query_tokens=cfg.get("num_query_tokens", 32),
        cross_attention_frequency=freq,
        hidden_act=act,
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=cfg.get("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=cfg.get("attention_probs_dropout_prob", 0.1),
        initializer_range=cfg.get("initializer_range", 0.02),
        max_position_embeddings=cfg.get("max_position_embeddings", 512),
        raw=dict(cfg),
    )


def smartedit_config(llm_width: int, **overrides) -> QFormerConfig:
  """The SmartEdit release's Q-Former: bert-base sizes, 6 layers, cross-attention on 0, 2, 4 to
  the LLM's hidden states, 77 queries (the CLIP text context's length and width)."""
  cfg = dict(
      hidden_size=768,
      num_hidden_layers=6,
      num_attention_heads=12,
      intermediate_size=3072,
      encoder_hidden_size=llm_width,
      num_query_tokens=77,
      cross_attention_frequency=2,
  )
  return QFormerConfig.from_dict({**cfg, **overrides})


def _drop(dropout: nnx.Dropout, x):
  # Elementwise, so the shape is free: flat, XLA:CPU compiles the random bits several times faster
  # than for the 3-D activations and 4-D attention probabilities (seconds per site on 2 cores).
  return dropout(x.reshape(-1)).reshape(x.shape)


def _linear(cin, cout, cfg, *, dtype, param_dtype, rngs):
  # BERT's initialisation (normal(initializer_range), zero bias), which the release trains from.
  init = nnx.initializers.normal(cfg.initializer_range)
  return nnx.Linear(cin, cout, kernel_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _layer_norm(cfg, **kw):
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_fast_variance=False, **kw)


class _MultiHeadAttention(nnx.Module):

  def __init__(self, cfg: QFormerConfig, kv_width, **kw):
    h = cfg.hidden_size
    self.heads, self.head_dim = cfg.num_attention_heads, h // cfg.num_attention_heads
    self.query = _linear(h, h, cfg, **kw)
    self.key, self.value = _linear(kv_width, h, cfg, **kw), _linear(kv_width, h, cfg, **kw)
    # Off until `model.train()`: inference code that forgets `eval()` must not drop out.
    self.dropout = nnx.Dropout(
        cfg.attention_probs_dropout_prob, deterministic=True, rngs=kw["rngs"]
    )

  def __call__(self, x, context, mask):
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, y.shape[1], self.heads, self.head_dim)  # noqa: E731
    q, k, v = split(self.query(x)), split(self.key(context)), split(self.value(context))
    scale = self.head_dim**-0.5
    if self.dropout.deterministic or self.dropout.rate == 0:
      out = jax.nn.dot_product_attention(
          q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, scale=scale
      )
    else:  # the release drops out attention probabilities in training, which the fused kernel can't
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
      if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
      probs = _drop(self.dropout, jax.nn.softmax(logits, axis=-1)).astype(v.dtype)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.reshape(b, t, self.heads * self.head_dim)


class _ResidualOutput(nnx.Module):
  """dense -> dropout -> LayerNorm(x + residual): BERT's `SelfOutput` and `Output`."""

  def __init__(self, cfg: QFormerConfig, cin, **kw):
    self.dense = _linear(cin, cfg.hidden_size, cfg, **kw)
    self.LayerNorm = _layer_norm(cfg, **kw)  # pylint: disable=invalid-name
    self.dropout = nnx.Dropout(cfg.hidden_dropout_prob, deterministic=True, rngs=kw["rngs"])

  def __call__(self, x, residual):
    return self.LayerNorm(_drop(self.dropout, self.dense(x)) + residual)


class _Attention(nnx.Module):

  def __init__(self, cfg: QFormerConfig, kv_width, **kw):
    self.attention = _MultiHeadAttention(cfg, kv_width, **kw)
    self.output = _ResidualOutput(cfg, cfg.hidden_size, **kw)

  def __call__(self, x, context=None, mask=None):
    return self.output(self.attention(x, x if context is None else context, mask), x)


class _Intermediate(nnx.Module):

  def __init__(self, cfg: QFormerConfig, **kw):
    self.dense = _linear(cfg.hidden_size, cfg.intermediate_size, cfg, **kw)
    self.act = _ACTS[cfg.hidden_act]

  def __call__(self, x):
    return self.act(self.dense(x))


class QFormerLayer(nnx.Module):

  def __init__(self, cfg: QFormerConfig, index: int, **kw):
    self.attention = _Attention(cfg, cfg.hidden_size, **kw)
    self.crossattention = (
        _Attention(cfg, cfg.encoder_hidden_size, **kw) if cfg.has_cross_attention(index) else None
    )
    self.intermediate_query = _Intermediate(cfg, **kw)
    self.output_query = _ResidualOutput(cfg, cfg.intermediate_size, **kw)

  def __call__(self, x, context, context_mask):
    x = self.attention(x)
    if self.crossattention is not None:
      x = self.crossattention(x, context, context_mask)
    return self.output_query(self.intermediate_query(x), x)


class _Encoder(nnx.Module):

  def __init__(self, cfg: QFormerConfig, **kw):
    self.layer = nnx.List([QFormerLayer(cfg, i, **kw) for i in range(cfg.num_hidden_layers)])


def _layer_call(layer, x, context, context_mask):
  return layer(x, context, context_mask)


class QFormer(nnx.Module):
  """`__call__(encoder_states [B, S, E], encoder_mask [B, S] or None) -> [B, Q, H]`.

  `encoder_mask` (true or 1 where a state is attended) is how the release picks the `<img_k>`
  positions out of the whole LLM sequence in training.
  """

  def __init__(
      self,
      config: QFormerConfig | dict,
      *,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      remat=(),
      rngs: nnx.Rngs,
  ):
    cfg = config if isinstance(config, QFormerConfig) else QFormerConfig.from_dict(config)
    bad = set(remat) - set(REMAT_CHOICES)
    if bad:
      raise ValueError(f"unknown remat block kind(s) {sorted(bad)}; choose from {REMAT_CHOICES}")
    self.config, self.dtype = cfg, dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query_tokens = nnx.Param(
        jax.random.normal(rngs.params(), (1, cfg.num_query_tokens, cfg.hidden_size), param_dtype)
        * cfg.initializer_range
    )
    self.layernorm = _layer_norm(cfg, **kw)
    self.dropout = nnx.Dropout(cfg.hidden_dropout_prob, deterministic=True, rngs=rngs)
    self.encoder = _Encoder(cfg, **kw)
    self.layer_call = maybe_remat(_layer_call, "layer" in remat)

  def __call__(self, encoder_states, encoder_mask=None):
    b = encoder_states.shape[0]
    queries = self.query_tokens[...]
    x = _drop(self.dropout, self.layernorm(jnp.broadcast_to(queries, (b,) + queries.shape[1:])))
    context = encoder_states.astype(self.dtype or encoder_states.dtype)
    mask = None if encoder_mask is None else encoder_mask.astype(bool)[:, None, None, :]
    for layer in self.encoder.layer:
      x = self.layer_call(layer, x, context, mask)
    return x
