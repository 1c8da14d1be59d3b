"""U-Net blocks: the spatial transformer and the down / mid / up blocks of an SD 1.x U-Net."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mre.models.layers import (
    Attention,
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    conv,
    group_norm,
    linear,
    maybe_remat,
)


class GEGLU(nnx.Module):
  """Linear to twice the width; one half gates the other through exact (erf) GELU."""

  def __init__(self, dim, inner, *, dtype, param_dtype, rngs):
    self.proj = linear(dim, 2 * inner, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    h, gate = jnp.split(self.proj(x), 2, axis=-1)
    return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):

  def __init__(self, dim, mult=4, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # `net.1` is diffusers' dropout slot (rate 0 in SD); kept so `net.2` keeps its state-dict name.
    self.net = nnx.List(
        [GEGLU(dim, dim * mult, **kw), nnx.Dropout(0.0), linear(dim * mult, dim, **kw)]
    )

  def __call__(self, x):
    return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
  """Self-attention, cross-attention to the text context, GEGLU feed-forward; pre-LayerNorm.

  With `only_cross` (diffusers' `only_cross_attention`) the first attention attends to the context
  as well: no attention over all pixels, whose cost grows with the square of their number.
  """

  def __init__(
      self, dim, heads, head_dim, context_dim, only_cross=False, *, dtype, param_dtype, rngs
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ln = lambda: nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, **kw)
    self.only_cross = only_cross
    self.norm1, self.norm2, self.norm3 = ln(), ln(), ln()
    self.attn1 = Attention(
        dim, heads, head_dim, context_dim=context_dim if only_cross else None, **kw
    )
    self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, **kw)
    self.ff = FeedForward(dim, **kw)

  def __call__(self, x, context):
    x = x + self.attn1(self.norm1(x), context if self.only_cross else None)
    x = x + self.attn2(self.norm2(x), context)
    return x + self.ff(self.norm3(x))


class Transformer2D(nnx.Module):
  """GroupNorm, project in (1x1 conv or linear), transformer blocks over H*W tokens, project out."""

  def __init__(
      self,
      channels,
      heads,
      context_dim,
      groups,
      num_layers=1,
      linear_proj=False,
      only_cross=False,
      *,
      dtype,
      param_dtype,
      rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_proj = linear_proj
    self.norm = group_norm(channels, groups, 1e-6, **kw)
    make = (
        (lambda: linear(channels, channels, **kw))
        if linear_proj
        else (lambda: conv(channels, channels, 1, padding=0, **kw))
    )
    self.proj_in = make()
    self.transformer_blocks = nnx.List(
        [
            BasicTransformerBlock(channels, heads, channels // heads, context_dim, only_cross, **kw)
            for _ in range(num_layers)
        ]
    )
    self.proj_out = make()

  def __call__(self, x, context):
    b, h, w, c = x.shape
    # Both projection kinds are pointwise over channels, so NHWC makes them the same reshape.
    tokens = self.proj_in(self.norm(x)).reshape(b, h * w, c)
    for block in self.transformer_blocks:
      tokens = block(tokens, context)
    return x + self.proj_out(tokens.reshape(b, h, w, c)).astype(x.dtype)


def _resnet_call(block, x, temb):
  return block(x, temb)


def _attn_call(block, x, context):
  return block(x, context)


class DownBlock(nnx.Module):
  """ResNet (+ spatial transformer) layers, then an optional stride-2 downsampler."""

  def __init__(
      self,
      cin,
      cout,
      temb_dim,
      num_layers,
      heads,
      depth,
      cfg,
      *,
      cross_attn,
      add_downsample,
      remat,
      only_cross=False,
      dtype,
      param_dtype,
      rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List(
        [
            ResnetBlock2D(
                cin if i == 0 else cout,
                cout,
                temb_dim,
                cfg.norm_num_groups,
                cfg.norm_eps,
                time_norm=cfg.resnet_time_scale_shift,
                **kw,
            )
            for i in range(num_layers)
        ]
    )
    self.attentions = (
        nnx.List(
            [
                Transformer2D(
                    cout,
                    heads,
                    cfg.cross_attention_dim,
                    cfg.norm_num_groups,
                    depth,
                    cfg.use_linear_projection,
                    only_cross,
                    **kw,
                )
                for _ in range(num_layers)
            ]
        )
        if cross_attn
        else None
    )
    self.downsamplers = (
        nnx.List([Downsample2D(cout, cfg.downsample_padding, **kw)]) if add_downsample else None
    )
    self.resnet_call = maybe_remat(_resnet_call, "resnet" in remat)
    self.attn_call = maybe_remat(_attn_call, "transformer" in remat)

  def __call__(self, x, temb, context):
    skips = []
    for i, resnet in enumerate(self.resnets):
      x = self.resnet_call(resnet, x, temb)
      if self.attentions is not None:
        x = self.attn_call(self.attentions[i], x, context)
      skips.append(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
      skips.append(x)
    return x, skips


class MidBlock(nnx.Module):
  """ResNet, spatial transformer, ResNet at the lowest resolution."""

  def __init__(self, channels, temb_dim, heads, depth, cfg, *, remat, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    res = lambda: ResnetBlock2D(
        channels,
        channels,
        temb_dim,
        cfg.norm_num_groups,
        cfg.norm_eps,
        cfg.mid_block_scale_factor,
        time_norm=cfg.resnet_time_scale_shift,
        **kw,
    )
    self.resnets = nnx.List([res(), res()])
    self.attentions = nnx.List(
        [
            Transformer2D(
                channels,
                heads,
                cfg.cross_attention_dim,
                cfg.norm_num_groups,
                depth,
                cfg.use_linear_projection,
                **kw,
            )
        ]
    )
    self.resnet_call = maybe_remat(_resnet_call, "resnet" in remat)
    self.attn_call = maybe_remat(_attn_call, "transformer" in remat)

  def __call__(self, x, temb, context):
    x = self.resnet_call(self.resnets[0], x, temb)
    x = self.attn_call(self.attentions[0], x, context)
    return self.resnet_call(self.resnets[1], x, temb)


class UpBlock(nnx.Module):
  """ResNet (+ spatial transformer) layers over [x | skip] concatenations, then 2x upsampling."""

  def __init__(
      self,
      cin,
      cout,
      prev_cout,
      temb_dim,
      num_layers,
      heads,
      depth,
      cfg,
      *,
      cross_attn,
      add_upsample,
      remat,
      only_cross=False,
      dtype,
      param_dtype,
      rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    resnets = []
    for i in range(num_layers):
      skip = cin if i == num_layers - 1 else cout
      first = prev_cout if i == 0 else cout
      resnets.append(
          ResnetBlock2D(
              first + skip,
              cout,
              temb_dim,
              cfg.norm_num_groups,
              cfg.norm_eps,
              time_norm=cfg.resnet_time_scale_shift,
              **kw,
          )
      )
    self.resnets = nnx.List(resnets)
    self.attentions = (
        nnx.List(
            [
                Transformer2D(
                    cout,
                    heads,
                    cfg.cross_attention_dim,
                    cfg.norm_num_groups,
                    depth,
                    cfg.use_linear_projection,
                    only_cross,
                    **kw,
                )
                for _ in range(num_layers)
            ]
        )
        if cross_attn
        else None
    )
    self.upsamplers = nnx.List([Upsample2D(cout, **kw)]) if add_upsample else None
    self.resnet_call = maybe_remat(_resnet_call, "resnet" in remat)
    self.attn_call = maybe_remat(_attn_call, "transformer" in remat)

  def __call__(self, x, skips, temb, context, upsample_size=None):
    for i, resnet in enumerate(self.resnets):
      x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
      x = self.resnet_call(resnet, x, temb)
      if self.attentions is not None:
        x = self.attn_call(self.attentions[i], x, context)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x, upsample_size)
    return x
