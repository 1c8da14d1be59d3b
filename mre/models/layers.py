"""Building blocks shared by the U-Net and the autoencoder (NHWC layout throughout).

Attribute names mirror the diffusers PyTorch modules (`conv1`, `time_emb_proj`, `to_out.0`, ...), so
that a parameter's NNX path *is* its diffusers state-dict name; `mre/model_io/torch_state_dict.py`
relies on it.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
from flax import nnx


class GroupNorm(nnx.Module):
  """GroupNorm over channels-last inputs [B, ..., C] with PyTorch's arithmetic (two-pass variance,
  float32 statistics) and flax's parameter names (`scale`, `bias`).

  Statistics are reduced over the spatial axes per channel first and only then per group: XLA:CPU
  runs that about twice as fast, forward and backward, as `nnx.GroupNorm`'s reduction over a
  [B, H, W, G, C/G] view (the ~20 norms of a toy U-Net step), with the same result to ~1e-6.
  """

  def __init__(self, channels, groups, eps, *, dtype, param_dtype, rngs):
    del rngs  # no random initialisation
    if channels % groups:
      raise ValueError(f"GroupNorm: {channels} channels do not split into {groups} groups")
    self.groups, self.eps, self.dtype = groups, eps, dtype
    self.scale = nnx.Param(jnp.ones((channels,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))

  def __call__(self, x):
    b, c = x.shape[0], x.shape[-1]
    spatial = tuple(range(1, x.ndim - 1))
    per_group = c // self.groups
    count = per_group * math.prod(x.shape[1:-1])
    xf = x.astype(jnp.float32)
    bcast = lambda v: v.reshape((b,) + (1,) * len(spatial) + (c,))  # noqa: E731
    to_channels = lambda v: jnp.repeat(v, per_group, axis=1)  # [B, G] -> [B, C]  # noqa: E731
    group_sum = lambda v: v.reshape(b, self.groups, per_group).sum(-1)  # noqa: E731
    mean = group_sum(jnp.sum(xf, axis=spatial)) / count
    centred = xf - bcast(to_channels(mean))
    var = group_sum(jnp.sum(centred * centred, axis=spatial)) / count
    inv = to_channels(jax.lax.rsqrt(var + self.eps)) * self.scale[...].astype(jnp.float32)
    out = centred * bcast(inv) + self.bias[...].astype(jnp.float32)
    return out.astype(self.dtype or x.dtype)


def attention_implementation(dtype, head_dim, backend, compute_capability=None):
  """The `implementation` of `jax.nn.dot_product_attention` to ask for: "cudnn" (the fused,
  flash-style kernel) on a GPU where its constraints hold (float16/bfloat16, head dim a multiple of
  8 up to 128, 256 from Hopper on), else None (XLA's, the only one on CPU and TPU).
  MRE_ATTENTION=xla in the environment keeps XLA's everywhere."""
  if os.environ.get("MRE_ATTENTION", "auto") == "xla" or backend != "gpu":
    return None
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return None
  try:
    hopper = float(compute_capability or 0) >= 9.0
  except ValueError:
    hopper = False
  return "cudnn" if head_dim % 8 == 0 and head_dim <= (256 if hopper else 128) else None


def attention(q, k, v, *, scale):
  """Multi-head attention over [B, T, heads, head_dim] inputs, cuDNN's kernel where it applies."""
  device = jax.devices()[0]
  implementation = attention_implementation(
      q.dtype, q.shape[-1], device.platform, getattr(device, "compute_capability", None)
  )
  return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)


def group_norm(channels, groups, eps, *, dtype, param_dtype, rngs):
  return GroupNorm(channels, groups, eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def conv(cin, cout, kernel=3, stride=1, padding=1, *, dtype, param_dtype, rngs):
  pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
  return nnx.Conv(
      cin,
      cout,
      (kernel, kernel),
      strides=stride,
      padding=pad,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
  )


def linear(cin, cout, *, use_bias=True, dtype, param_dtype, rngs):
  return nnx.Linear(cin, cout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def sinusoidal_embedding(timesteps, dim, flip_sin_to_cos=True, freq_shift=0.0, max_period=10000.0):
  """Sinusoidal embedding of (possibly fractional) timesteps, computed in float32 like diffusers."""
  timesteps = jnp.asarray(timesteps, jnp.float32).reshape(-1)
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nnx.Module):
  """linear_1 -> SiLU -> linear_2 (diffusers `TimestepEmbedding`)."""

  def __init__(self, cin, dim, cout=None, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_1 = linear(cin, dim, **kw)
    self.linear_2 = linear(dim, cout or dim, **kw)

  def __call__(self, x):
    return self.linear_2(nnx.silu(self.linear_1(x)))


class AttentionPooling(nnx.Module):
  """diffusers' `AttentionPooling` (from DeepFloyd IF): a class token, the tokens' mean plus a
  learned position, attends to itself and the tokens; its output is the pooled vector."""

  def __init__(self, heads, dim, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.heads, self.dtype = heads, dtype
    self.positional_embedding = nnx.Param(
        jax.random.normal(rngs.params(), (1, dim), param_dtype) / dim**0.5
    )
    self.k_proj, self.q_proj, self.v_proj = (linear(dim, dim, **kw) for _ in range(3))

  def __call__(self, x):
    b, _, d = x.shape
    cls = x.mean(axis=1, keepdims=True) + self.positional_embedding[...].astype(x.dtype)
    tokens = jnp.concatenate([cls, x], axis=1)
    split = lambda t: t.reshape(b, t.shape[1], self.heads, d // self.heads)  # noqa: E731
    q, k, v = split(self.q_proj(cls)), split(self.k_proj(tokens)), split(self.v_proj(tokens))
    # diffusers scales q and k by dim**-0.25 each; the product is the usual dim**-0.5.
    out = jax.nn.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), scale=(d // self.heads) ** -0.5
    )
    return out.reshape(b, d)


class TextTimeEmbedding(nnx.Module):
  """diffusers' `TextTimeEmbedding` (`addition_embed_type="text"`): the text context, pooled by
  attention, projected to the time-embedding width and added to the time embedding, so the
  instruction reaches every ResNet block, not only the attention layers."""

  def __init__(self, text_dim, temb_dim, heads, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = nnx.LayerNorm(text_dim, epsilon=1e-5, use_fast_variance=False, **kw)
    self.pool = AttentionPooling(heads, text_dim, **kw)
    self.proj = linear(text_dim, temb_dim, **kw)
    self.norm2 = nnx.LayerNorm(temb_dim, epsilon=1e-5, use_fast_variance=False, **kw)

  def __call__(self, context):
    return self.norm2(self.proj(self.pool(self.norm1(context))))


class Attention(nnx.Module):
  """Multi-head attention with diffusers' parameter names; self-attention when `context` is None.

  `group_norm_groups` adds the VAE-style GroupNorm + residual around it (4-D input).
  """

  def __init__(
      self,
      query_dim,
      heads,
      head_dim,
      *,
      context_dim=None,
      qkv_bias=False,
      group_norm_groups=None,
      norm_eps=1e-6,
      dtype,
      param_dtype,
      rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    inner = heads * head_dim
    self.heads, self.head_dim = heads, head_dim
    self.group_norm = (
        group_norm(query_dim, group_norm_groups, norm_eps, **kw) if group_norm_groups else None
    )
    self.to_q = linear(query_dim, inner, use_bias=qkv_bias, **kw)
    self.to_k = linear(context_dim or query_dim, inner, use_bias=qkv_bias, **kw)
    self.to_v = linear(context_dim or query_dim, inner, use_bias=qkv_bias, **kw)
    self.to_out = nnx.List([linear(inner, query_dim, **kw)])

  def attend(self, x, context=None):
    b = x.shape[0]
    context = x if context is None else context
    split = lambda t: t.reshape(b, t.shape[1], self.heads, self.head_dim)
    q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    out = attention(q, k, v, scale=self.head_dim**-0.5)
    return self.to_out[0](out.reshape(b, x.shape[1], self.heads * self.head_dim))

  def __call__(self, x, context=None):
    if self.group_norm is None:
      return self.attend(x, context)
    b, h, w, c = x.shape
    out = self.attend(self.group_norm(x).reshape(b, h * w, c), context)
    return x + out.reshape(b, h, w, c).astype(x.dtype)


TIME_NORMS = ("default", "scale_shift")


class ResnetBlock2D(nnx.Module):
  """GroupNorm-SiLU-conv twice, time embedding in between, 1x1 shortcut when widths differ.

  `time_norm` is diffusers' `resnet_time_scale_shift`: "default" adds the projected time embedding
  after the first conv; "scale_shift" projects it to a per-channel scale and shift applied after the
  second GroupNorm (FiLM), so the conditioning can gate features, not only offset them.
  """

  def __init__(
      self,
      cin,
      cout,
      temb_dim,
      groups,
      eps,
      output_scale_factor=1.0,
      time_norm="default",
      *,
      dtype,
      param_dtype,
      rngs,
  ):
    if time_norm not in TIME_NORMS:
      raise ValueError(f"unknown time embedding norm {time_norm!r}; expected one of {TIME_NORMS}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = group_norm(cin, groups, eps, **kw)
    self.conv1 = conv(cin, cout, **kw)
    self.time_norm = time_norm
    width = 2 * cout if time_norm == "scale_shift" else cout
    self.time_emb_proj = linear(temb_dim, width, **kw) if temb_dim else None
    self.norm2 = group_norm(cout, groups, eps, **kw)
    self.conv2 = conv(cout, cout, **kw)
    self.conv_shortcut = conv(cin, cout, 1, padding=0, **kw) if cin != cout else None
    self.output_scale_factor = output_scale_factor

  def __call__(self, x, temb=None):
    h = self.conv1(nnx.silu(self.norm1(x)))
    t = None
    if self.time_emb_proj is not None and temb is not None:
      t = self.time_emb_proj(nnx.silu(temb))[:, None, None, :].astype(h.dtype)
    if self.time_norm == "scale_shift":
      if t is None:
        raise ValueError("a scale_shift ResNet block needs the time embedding")
      scale, shift = jnp.split(t, 2, axis=-1)
      h = self.norm2(h) * (1 + scale) + shift
    else:
      h = self.norm2(h if t is None else h + t)
    h = self.conv2(nnx.silu(h))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    out = x.astype(h.dtype) + h
    return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nnx.Module):
  """Stride-2 3x3 conv; padding 0 means diffusers' asymmetric (0, 1) pad (the VAE encoder)."""

  def __init__(self, channels, padding=1, *, dtype, param_dtype, rngs):
    pad = padding if padding else ((0, 1), (0, 1))
    self.conv = conv(
        channels,
        channels,
        3,
        stride=2,
        padding=pad,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )

  def __call__(self, x):
    return self.conv(x)


def upsample_nearest(x, size=None):
  """Nearest upsampling matching torch's `interpolate(mode='nearest')` (2x, or to `size`)."""
  if size is None or tuple(size) == (2 * x.shape[1], 2 * x.shape[2]):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  rows = (jnp.arange(size[0]) * x.shape[1]) // size[0]
  cols = (jnp.arange(size[1]) * x.shape[2]) // size[1]
  return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
  """Nearest 2x upsampling followed by a 3x3 conv."""

  def __init__(self, channels, *, dtype, param_dtype, rngs):
    self.conv = conv(channels, channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, size=None):
    return self.conv(upsample_nearest(x, size))


def maybe_remat(fn, enabled):
  """Rematerialise `fn(module, *args)` in the backward pass when `enabled` (saves activations).

  `jax.checkpoint` over the module's state, not `nnx.remat`: the block is pure, and `nnx.remat`
  writes its Variables back after the call, which fails when the module was made at another trace
  level (the editor's compiled sampling loop calls the U-Net inside `lax.fori_loop`).
  """
  if not enabled:
    return fn

  def call(module, *args):
    graphdef, state = nnx.split(module)
    return jax.checkpoint(lambda state, *a: fn(nnx.merge(graphdef, state), *a))(state, *args)

  return call
