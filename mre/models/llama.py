"""LLaMA decoder (transformers' `LlamaForCausalLM`): RMSNorm, rotary positions, SwiGLU MLP,
grouped-query attention, an untied `lm_head`; a fixed-size KV cache and generation as one loop.

Padding. Without a cache a batch may be left- or right-padded: keys at padding are masked and each
row's positions count its real tokens only (what transformers' `generate` does; a right-padded row
gets 0..n-1, as in a plain transformers forward). The KV cache takes either too (every row writes
the same slots; a padding slot stays masked). `generate` takes left-padded prompts only: it reads
each row's next-token logits from the last column.

Attribute names are transformers' (`model.layers.N.self_attn.q_proj`, `lm_head`, ...), so a
parameter's path is its state-dict name; `mre/model_io/llama_weights.py` reads and writes them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mre.models.config import ConfigError, refuse, require
from mre.models.layers import linear, maybe_remat

REMAT_CHOICES = ("layer",)  # rematerialise each decoder layer in the backward pass
_ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = "default"
  # llama3 only: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).
  rope_llama3: tuple = ()
  max_position_embeddings: int = 2048
  attention_bias: bool = False
  mlp_bias: bool = False
  bos_token_id: Optional[int] = 1
  eos_token_id: Any = 2
  pad_token_id: Optional[int] = None
  raw: Any = dataclasses.field(default=None, compare=False, repr=False)

  @classmethod
  def from_dict(cls, cfg: dict) -> "LlamaConfig":
    """A transformers `LlamaConfig` dict (config.json, or `LlamaConfig(...).to_dict()`)."""
    where = "LlamaForCausalLM"
    require(
        cfg,
        [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ],
        where,
    )
    # LLaVA-1.x checkpoints (SmartEdit's LLM) carry a LLaMA under model_type "llava".
    refuse(cfg, "model_type", ("llama", "llava", "llava_llama"), where, "llama")
    refuse(cfg, "hidden_act", ("silu",), where, "silu")
    refuse(cfg, "tie_word_embeddings", (False,), where, False)
    refuse(cfg, "attention_dropout", (0, 0.0), where, 0.0)
    refuse(cfg, "sliding_window", (None,), where)
    # transformers 5 keeps rope_theta inside `rope_parameters`; older configs have `rope_theta`
    # and `rope_scaling` (None, or a dict with "type" / "rope_type").
    rope = dict(cfg.get("rope_scaling") or {})
    rope.update(cfg.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    refuse({"rope_type": rope_type}, "rope_type", _ROPE_TYPES, where + " rope parameters")
    refuse(rope, "partial_rotary_factor", (1, 1.0), where + " rope parameters", 1.0)
    llama3 = ()
    if rope_type == "llama3":
      keys = ("factor", "low_freq_factor", "high_freq_factor")
      require(rope, keys, where + " llama3 rope parameters")
      original = rope.get(
          "original_max_position_embeddings", cfg.get("max_position_embeddings", 2048)
      )
      llama3 = tuple(float(rope[k]) for k in keys) + (float(original),)
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads % kv_heads:
      raise ConfigError(
          f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
      )
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return cls(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rope_type=rope_type,
        rope_llama3=llama3,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        attention_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        bos_token_id=cfg.get("bos_token_id", 1),
        eos_token_id=cfg.get("eos_token_id", 2),
        pad_token_id=cfg.get("pad_token_id"),
        raw=dict(cfg),
    )


def rope_frequencies(cfg: LlamaConfig) -> np.ndarray:
  """The rotary inverse frequencies [head_dim / 2], float32, as transformers computes them."""
  d = cfg.head_dim
  inv = (1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))).astype(np.float32)
  if cfg.rope_type == "default":
    return inv
  # Llama 3.1's rule: long wavelengths slowed by `factor`, short ones kept, a ramp in between.
  factor, low, high, original = cfg.rope_llama3
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > original / low, inv / factor, inv)
  ramp = (original / wavelen - low) / (high - low)
  smoothed = (1 - ramp) * scaled / factor + ramp * scaled
  medium = (wavelen >= original / high) & (wavelen <= original / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rotary(positions, cfg: LlamaConfig, dtype):
  """cos, sin [B, T, head_dim] for integer positions [B, T] (halves repeated, transformers' order)."""
  freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(rope_frequencies(cfg))
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rotary(x, cos, sin):
  """x [B, T, heads, D] rotated by position: the first and second halves of D form the pairs."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None] + rotated * sin[:, :, None]


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, statistics in float32, normalised value cast back before the scale."""

  def __init__(self, dim, eps, *, dtype, param_dtype, rngs):
    del rngs  # no random initialisation
    self.eps, self.dtype = eps, dtype
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x):
    dtype = self.dtype or x.dtype
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(dtype) * normed.astype(dtype)


class LlamaAttention(nnx.Module):
  """Grouped-query self-attention: `num_key_value_heads` key/value heads, each shared by
  `num_attention_heads / num_key_value_heads` query heads (transformers' grouping)."""

  def __init__(self, cfg: LlamaConfig, **kw):
    self.heads, self.kv_heads, self.head_dim = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    )
    d, bias = cfg.hidden_size, cfg.attention_bias
    self.q_proj = linear(d, self.heads * self.head_dim, use_bias=bias, **kw)
    self.k_proj = linear(d, self.kv_heads * self.head_dim, use_bias=bias, **kw)
    self.v_proj = linear(d, self.kv_heads * self.head_dim, use_bias=bias, **kw)
    self.o_proj = linear(self.heads * self.head_dim, d, use_bias=bias, **kw)

  def __call__(self, x, cos, sin, mask, kv=None, index=None):
    """`kv` = (keys, values) [B, S, kv_heads, D] of a cache: the new keys are written at slot
    `index` and the queries attend to all S slots (through `mask`). Returns (out, kv)."""
    b, t, _ = x.shape
    q = apply_rotary(self.q_proj(x).reshape(b, t, self.heads, self.head_dim), cos, sin)
    k = apply_rotary(self.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim), cos, sin)
    v = self.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
    if kv is not None:
      start = (0, index, 0, 0)
      k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
      v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
      kv = (k, v)
    out = jax.nn.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), mask=mask, scale=self.head_dim**-0.5
    )
    return self.o_proj(out.reshape(b, t, self.heads * self.head_dim)), kv


class LlamaMLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: LlamaConfig, **kw):
    d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
    self.gate_proj = linear(d, f, use_bias=bias, **kw)
    self.up_proj = linear(d, f, use_bias=bias, **kw)
    self.down_proj = linear(f, d, use_bias=bias, **kw)

  def __call__(self, x):
    return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
  """Pre-norm attention and MLP, each added to the residual stream."""

  def __init__(self, cfg: LlamaConfig, **kw):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.self_attn = LlamaAttention(cfg, **kw)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.mlp = LlamaMLP(cfg, **kw)

  def __call__(self, x, cos, sin, mask, kv=None, index=None):
    h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, index)
    x = x + h
    return x + self.mlp(self.post_attention_layernorm(x)), kv


def _layer_call(layer, x, cos, sin, mask, kv, index):
  return layer(x, cos, sin, mask, kv, index)


class KVCache(NamedTuple):
  """Fixed-size cache: S slots per layer, filled left to right; `index` is the next slot.

  Size it for the prompt plus every token to come (`init_cache`): under jit a write past slot S
  cannot be caught and would land on the last slots.
  """

  keys: tuple  # per layer [B, S, kv_heads, head_dim]
  values: tuple  # per layer, same shape
  valid: jax.Array  # [B, S] bool: the slot holds a real (not padding) token
  index: jax.Array  # int32 scalar


class LlamaOutput(NamedTuple):
  logits: jax.Array  # [B, T, vocab]
  hidden_states: jax.Array  # [B, T, hidden] after the final norm (what `lm_head` reads)
  cache: Optional[KVCache]  # the updated cache, or None without one


class LlamaModel(nnx.Module):
  """Token embedding, decoder layers, final norm: `__call__ -> (hidden [B,T,D], cache)`."""

  def __init__(self, cfg: LlamaConfig, *, remat, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.config, self.dtype = cfg, dtype
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **kw)
    self.layers = nnx.List([LlamaDecoderLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.layer_call = maybe_remat(_layer_call, "layer" in remat)

  def __call__(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, cache=None):
    """`attention_mask` [B, T] marks the real tokens of this call (1) and padding (0); with a
    cache, the new tokens are appended at `cache.index` and attend to everything cached."""
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("give exactly one of input_ids and inputs_embeds")
    x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    x = x.astype(self.dtype)
    b, t = x.shape[:2]
    new = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    q_slot = jnp.arange(t)
    if cache is None:
      seen, valid, k_slot, index = 0, new, q_slot, None
    else:
      if t > cache.valid.shape[1]:
        raise ValueError(f"{t} tokens do not fit a cache of {cache.valid.shape[1]} slots")
      index = cache.index
      seen = cache.valid.sum(-1, dtype=jnp.int32)[:, None]
      valid = jax.lax.dynamic_update_slice(cache.valid, new, (0, index))
      q_slot, k_slot = q_slot + index, jnp.arange(valid.shape[1])
    positions = jnp.maximum(seen + jnp.cumsum(new, axis=-1, dtype=jnp.int32) - 1, 0)
    causal = k_slot[None, :] <= q_slot[:, None]
    # A query always sees itself, so that a padding query's softmax has one finite entry.
    mask = (causal[None] & valid[:, None, :]) | (k_slot[None, :] == q_slot[:, None])[None]
    cos, sin = rotary(positions, self.config, x.dtype)
    keys, values = [], []
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (cache.keys[i], cache.values[i])
      x, kv = self.layer_call(layer, x, cos, sin, mask[:, None], kv, index)
      if kv is not None:
        keys.append(kv[0])
        values.append(kv[1])
    x = self.norm(x)
    if cache is None:
      return x, None
    return x, KVCache(tuple(keys), tuple(values), valid, index + t)


class LlamaForCausalLM(nnx.Module):
  """`__call__(input_ids [B,T], attention_mask=None, *, inputs_embeds=None, cache=None)
  -> LlamaOutput(logits, hidden_states, cache)`."""

  def __init__(
      self,
      config: LlamaConfig | dict,
      *,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      remat=(),
      rngs: nnx.Rngs,
  ):
    cfg = config if isinstance(config, LlamaConfig) else LlamaConfig.from_dict(config)
    bad = set(remat) - set(REMAT_CHOICES)
    if bad:
      raise ValueError(f"unknown remat kind(s) {sorted(bad)}; choose from {REMAT_CHOICES}")
    self.config, self.dtype = cfg, dtype
    self.model = LlamaModel(cfg, remat=remat, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.lm_head = linear(
        cfg.hidden_size,
        cfg.vocab_size,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )

  def __call__(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, cache=None):
    hidden, cache = self.model(input_ids, attention_mask, inputs_embeds=inputs_embeds, cache=cache)
    return LlamaOutput(self.lm_head(hidden), hidden, cache)

  def init_cache(self, batch: int, length: int, dtype=None) -> KVCache:
    """An empty cache of `length` slots (the prompt plus every token to be generated)."""
    cfg = self.config
    shape = (batch, length, cfg.num_key_value_heads, cfg.head_dim)
    zeros = lambda: tuple(
        jnp.zeros(shape, dtype or self.dtype) for _ in range(cfg.num_hidden_layers)
    )
    return KVCache(zeros(), zeros(), jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))


# --- generation -----------------------------------------------------------------------------------


class Generation(NamedTuple):
  tokens: jax.Array  # [B, N] int32; `pad_token_id` after a row's end-of-sequence token
  # [B, N, hidden]: the final-norm hidden state at each generated token's position, i.e. computed
  # with that token as input (what teacher forcing gives at the same position); zero after the end.
  hidden_states: jax.Array
  lengths: jax.Array  # [B] tokens generated per row, end-of-sequence included


def sample_logits(logits, temperature, key):
  """argmax of `logits` [..., V] when temperature is 0, else a draw from softmax(logits / T)."""
  logits = logits.astype(jnp.float32)
  t = jnp.asarray(temperature, jnp.float32)
  drawn = jax.random.categorical(key, logits / jnp.where(t > 0, t, 1.0), axis=-1)
  return jnp.where(t > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def check_left_padded(attention_mask):
  """Refuses a mask (when its values are known) with a real token before a padding one."""
  if attention_mask is None:
    return
  try:
    m = np.asarray(attention_mask).astype(bool)
  except jax.errors.TracerArrayConversionError:  # traced: the caller answers for it
    return
  bad = np.nonzero((m[:, :-1] & ~m[:, 1:]).any(-1) | ~m[:, -1])[0]
  if bad.size:
    raise ValueError(
        f"generate takes left-padded prompts (padding first, the last column real); rows "
        f"{bad.tolist()} are not"
    )


def generate(
    model: LlamaForCausalLM,
    input_ids=None,
    attention_mask=None,
    *,
    max_new_tokens: int,
    eos_token_id,
    pad_token_id: int = 0,
    temperature=0.0,
    key=None,
    inputs_embeds=None,
) -> Generation:
  """Greedy (temperature 0) or temperature sampling from left-padded prompts, compiled as one
  loop that stops when every row has produced `eos_token_id` (an int or a tuple of ints).

  The temperature is traced: greedy and sampling share one compiled program. `inputs_embeds`
  [B, T, hidden] replaces the prompt's token embeddings (image features spliced in).
  """
  check_left_padded(attention_mask)
  eos = tuple(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else (int(eos_token_id),)
  key = jax.random.key(0) if key is None else key
  return _generate(
      model,
      input_ids,
      attention_mask,
      inputs_embeds,
      jnp.asarray(temperature, jnp.float32),
      key,
      max_new_tokens=int(max_new_tokens),
      eos=eos,
      pad=int(pad_token_id),
  )


@nnx.jit(static_argnames=("max_new_tokens", "eos", "pad"))
def _generate(
    model, input_ids, attention_mask, inputs_embeds, temperature, key, *, max_new_tokens, eos, pad
):
  n = max_new_tokens
  prompt = input_ids if inputs_embeds is None else inputs_embeds
  b, t = prompt.shape[:2]
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), bool)
  hidden, cache = model.model(
      input_ids, attention_mask, inputs_embeds=inputs_embeds, cache=model.init_cache(b, t + n)
  )
  first = sample_logits(model.lm_head(hidden[:, -1]), temperature, jax.random.fold_in(key, 0))
  tokens = jnp.full((b, n), pad, jnp.int32).at[:, 0].set(first)
  states = jnp.zeros((b, n, hidden.shape[-1]), hidden.dtype)
  # alive[r]: token i of row r is a real one (no end-of-sequence before it).
  init = (jnp.int32(0), cache, tokens, states, jnp.ones((b,), bool), jnp.zeros((b,), jnp.int32))

  def cond(carry):
    i, alive = carry[0], carry[4]
    return (i < n) & alive.any()

  def body(carry):
    i, cache, tokens, states, alive, lengths = carry
    token = jax.lax.dynamic_index_in_dim(tokens, i, axis=1, keepdims=False)
    h, cache = model.model(token[:, None], alive[:, None], cache=cache)
    h = h[:, 0]
    row = jnp.where(alive[:, None], h, 0).astype(states.dtype)
    states = jax.lax.dynamic_update_index_in_dim(states, row, i, axis=1)
    nxt = sample_logits(model.lm_head(h), temperature, jax.random.fold_in(key, i + 1))
    lengths = lengths + alive
    alive = alive & ~jnp.isin(token, jnp.asarray(eos, jnp.int32))
    nxt = jnp.where(alive, nxt, pad)
    # At the last step there is no slot i + 1 (a clamped write would overwrite slot n - 1).
    written = jax.lax.dynamic_update_index_in_dim(tokens, nxt, jnp.minimum(i + 1, n - 1), axis=1)
    tokens = jnp.where(i + 1 < n, written, tokens)
    return i + 1, cache, tokens, states, alive, lengths

  _, _, tokens, states, _, lengths = jax.lax.while_loop(cond, body, init)
  return Generation(tokens, states, lengths)
