"""The conditional U-Net of Stable Diffusion 1.x (diffusers' `UNet2DConditionModel`), NHWC.

Two hooks let the reward modules (and any other conditioning) plug in without a fork:
`extra_time_emb` is added to the time embedding, so it reaches every ResNet block, and
`after_conv_in(h)` transforms the feature map right after `conv_in`.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from mre.models.config import UNetConfig
from mre.models.layers import (
    TextTimeEmbedding,
    TimestepEmbedding,
    attention,
    conv,
    group_norm,
    sinusoidal_embedding,
)
from mre.models.unet_blocks import DownBlock, MidBlock, UpBlock

REMAT_CHOICES = ("resnet", "transformer")


class UNet2DConditionModel(nnx.Module):
  """`__call__(sample [B,H,W,Cin], timesteps [B] or scalar, context [B,T,D]) -> [B,H,W,Cout]`."""

  def __init__(
      self,
      config: UNetConfig | dict,
      *,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      remat=(),
      rngs: nnx.Rngs,
  ):
    cfg = config if isinstance(config, UNetConfig) else UNetConfig.from_dict(config)
    bad = set(remat) - set(REMAT_CHOICES)
    if bad:
      raise ValueError(f"unknown remat block kind(s) {sorted(bad)}; choose from {REMAT_CHOICES}")
    self.config, self.dtype = cfg, dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ch = cfg.block_out_channels
    temb_dim = 4 * ch[0]
    self.conv_in = conv(_input_channels(cfg), ch[0], **kw)
    self.time_embedding = TimestepEmbedding(ch[0], temb_dim, **kw)
    if cfg.addition_embed_type == "text":
      self.add_embedding = TextTimeEmbedding(
          cfg.cross_attention_dim, temb_dim, cfg.addition_embed_type_num_heads, **kw
      )

    down, cout = [], ch[0]
    for i, kind in enumerate(cfg.down_block_types):
      cin, cout = cout, ch[i]
      down.append(
          DownBlock(
              cin,
              cout,
              temb_dim,
              cfg.layers_per_block[i],
              cfg.heads[i],
              cfg.transformer_layers[i],
              cfg,
              cross_attn=kind.startswith("CrossAttn"),
              add_downsample=i < len(ch) - 1,
              remat=remat,
              only_cross=cfg.only_cross_attention[i],
              **kw,
          )
      )
    self.down_blocks = nnx.List(down)
    self.mid_block = (
        MidBlock(
            ch[-1], temb_dim, cfg.heads[-1], cfg.transformer_layers[-1], cfg, remat=remat, **kw
        )
        if cfg.has_mid_block
        else None
    )

    rev_ch, rev_heads = ch[::-1], cfg.heads[::-1]
    rev_layers, rev_depth = cfg.layers_per_block[::-1], cfg.transformer_layers[::-1]
    up, cout = [], rev_ch[0]
    for i, kind in enumerate(cfg.up_block_types):
      prev, cout = cout, rev_ch[i]
      cin = rev_ch[min(i + 1, len(ch) - 1)]
      up.append(
          UpBlock(
              cin,
              cout,
              prev,
              temb_dim,
              rev_layers[i] + 1,
              rev_heads[i],
              rev_depth[i],
              cfg,
              cross_attn=kind.startswith("CrossAttn"),
              add_upsample=i < len(ch) - 1,
              remat=remat,
              only_cross=cfg.only_cross_attention[::-1][i],
              **kw,
          )
      )
    self.up_blocks = nnx.List(up)
    self.conv_norm_out = group_norm(ch[0], cfg.norm_num_groups, cfg.norm_eps, **kw)
    if not cfg.pixel_head_only:
      self.conv_out = conv(ch[0], cfg.out_channels, **kw)
    if cfg.noisy_skip:  # ours: a learned, time-dependent gain on the noisy input (see __call__)
      self.noisy_skip_gain = nnx.Linear(
          temb_dim,
          _noisy_channels(cfg),
          kernel_init=nnx.initializers.zeros,
          dtype=kw["dtype"],
          param_dtype=kw["param_dtype"],
          rngs=kw["rngs"],
      )
    if cfg.pixel_head:
      self.pixel_head = PixelHead(
          ch[0] + _input_channels(cfg) * (1 + 2 * cfg.pixel_head_fourier),
          temb_dim,
          cfg.pixel_head,
          cfg.out_channels + int(cfg.pixel_head_gate),
          text_dim=cfg.cross_attention_dim,
          text_attention=cfg.pixel_head_text_attention,
          **kw,
      )

  def time_embed(self, timesteps, batch):
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
    t_emb = sinusoidal_embedding(
        t, self.config.block_out_channels[0], self.config.flip_sin_to_cos, self.config.freq_shift
    )
    return self.time_embedding(t_emb.astype(self.dtype))

  def __call__(
      self,
      sample,
      timesteps,
      context,
      *,
      extra_time_emb=None,
      after_conv_in: Optional[Callable] = None,
      self_cond=None,
  ):
    sample = sample.astype(self.dtype)
    if self.config.self_condition:
      # Ours (Analog Bits' self-conditioning): an earlier x0 estimate joins the input channels;
      # zeros stand for "none yet" (the first sampling step, half of the training steps).
      if self_cond is None:
        self_cond = jnp.zeros(sample.shape[:-1] + (_latent_channels(self.config),), self.dtype)
      sample = jnp.concatenate([sample, self_cond.astype(self.dtype)], axis=-1)
    elif self_cond is not None:
      raise ValueError(
          "self_cond: this U-Net was not built to read an x0 estimate (mre_self_condition is off)"
      )
    context = context.astype(self.dtype)
    emb = self.time_embed(timesteps, sample.shape[0])
    if self.config.addition_embed_type == "text":
      emb = emb + self.add_embedding(context)
    if extra_time_emb is not None:
      emb = emb + extra_time_emb.astype(emb.dtype)
    if self.config.center_input_sample:
      sample = 2 * sample - 1.0
    h = self.conv_in(sample)
    if after_conv_in is not None:
      h = after_conv_in(h)

    skips = [h]
    for block in self.down_blocks:
      h, block_skips = block(h, emb, context)
      skips.extend(block_skips)
    if self.mid_block is not None:
      h = self.mid_block(h, emb, context)
    for block in self.up_blocks:
      mine = [skips.pop() for _ in block.resnets][::-1]
      # Upsample to the size of the next skip, as diffusers does for odd-sized inputs.
      size = skips[-1].shape[1:3] if skips else None
      h = block(h, mine, emb, context, upsample_size=size)
    features = nnx.silu(self.conv_norm_out(h))
    out = None if self.config.pixel_head_only else self.conv_out(features)
    if self.config.pixel_head:
      pixel = [sample * self.config.pixel_head_input_scale]
      for k in range(self.config.pixel_head_fourier):
        angle = (2.0**k * jnp.pi) * sample
        pixel += [jnp.sin(angle), jnp.cos(angle)]
      head = self.pixel_head(jnp.concatenate([features, *pixel], axis=-1), emb, context)
      if self.config.pixel_head_gate:  # "where" (a sigmoid gate) times "what" (the rest)
        head = jax.nn.sigmoid(head[..., -1:]) * head[..., :-1]
      out = head if out is None else out + head
    if self.config.noisy_skip:
      # The noisy input passed straight to the output with a gain read from the time (and
      # pooled-instruction) embedding, zero at the start: a conv net learns to copy its input
      # sharply only slowly, and at low noise the input is almost the answer.
      n = _noisy_channels(self.config)
      gain = self.noisy_skip_gain(emb)[:, None, None, :]
      out = jnp.concatenate([out[..., :n] + gain * sample[..., :n], out[..., n:]], axis=-1)
    return out


class PixelHead(nnx.Module):
  """Ours: a per-pixel MLP (1 x 1 convolutions) over the last features and the input pixel, with
  the time embedding added to its hidden layer; its output layer starts at zero.

  Every 3 x 3 layer mixes a pixel with its neighbours, so a U-Net's output is smooth unless it
  learns to cancel that mixing; most edits are colour maps of the source pixel gated by a smooth
  "where" (a recoloured object, a new background, a global tone). Here the input pixel meets the
  smooth features in a nonlinearity with no spatial mixing, so such a map keeps the source's edges.
  """

  def __init__(
      self,
      features: int,
      temb_dim: int,
      hidden: int,
      out: int,
      *,
      text_dim: int = 0,
      text_attention: int = 0,
      dtype,
      param_dtype,
      rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = nnx.Linear(features, hidden, **kw)
    self.time = nnx.Linear(temb_dim, hidden, **kw)
    self.fc2 = nnx.Linear(hidden, hidden, **kw)
    self.fc_out = nnx.Linear(hidden, out, kernel_init=nnx.initializers.zeros, **kw)
    self.text_attention = text_attention
    if text_attention:  # each pixel's query against the instruction tokens (one head)
      self.to_q = nnx.Linear(hidden, text_attention, use_bias=False, **kw)
      self.to_k = nnx.Linear(text_dim, text_attention, use_bias=False, **kw)
      self.to_v = nnx.Linear(text_dim, text_attention, use_bias=False, **kw)
      self.to_out = nnx.Linear(text_attention, hidden, kernel_init=nnx.initializers.zeros, **kw)

  def __call__(self, x, emb, context=None):
    h = nnx.silu(self.fc1(x) + self.time(nnx.silu(emb))[:, None, None, :])
    if self.text_attention:
      b, height, width, _ = h.shape
      q = self.to_q(h).reshape(b, height * width, 1, self.text_attention)
      k, v = self.to_k(context)[:, :, None], self.to_v(context)[:, :, None]
      a = attention(q, k, v, scale=self.text_attention**-0.5)
      h = h + self.to_out(a.reshape(b, height, width, self.text_attention))
    return self.fc_out(nnx.silu(self.fc2(h)))


def _latent_channels(cfg: UNetConfig) -> int:
  """Channels of the noisy latents (half of InstructPix2Pix's input: noisy | source)."""
  return cfg.in_channels // 2


def _input_channels(cfg: UNetConfig) -> int:
  """Channels conv_in reads: the config's, plus the x0 estimate's with self-conditioning."""
  return cfg.in_channels + (_latent_channels(cfg) if cfg.self_condition else 0)


def _noisy_channels(cfg: UNetConfig) -> int:
  """Channels of the noisy latents, which lead the input and match the output's first ones (the
  affine source skip's output adds a colour matrix after them)."""
  return _latent_channels(cfg) if cfg.source_skip_affine else cfg.out_channels
