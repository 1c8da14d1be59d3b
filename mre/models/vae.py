"""AutoencoderKL of Stable Diffusion (diffusers' `AutoencoderKL`), NHWC, images in [-1, 1]."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mre.models.config import VAEConfig
from mre.models.layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm

_EPS = 1e-6  # diffusers' encoder/decoder blocks use eps 1e-6 regardless of the config


class _EncoderBlock(nnx.Module):

  def __init__(self, cin, cout, layers, groups, add_downsample, **kw):
    self.resnets = nnx.List(
        [
            ResnetBlock2D(cin if i == 0 else cout, cout, None, groups, _EPS, **kw)
            for i in range(layers)
        ]
    )
    self.downsamplers = nnx.List([Downsample2D(cout, padding=0, **kw)]) if add_downsample else None

  def __call__(self, x):
    for r in self.resnets:
      x = r(x)
    return self.downsamplers[0](x) if self.downsamplers is not None else x


class _DecoderBlock(nnx.Module):

  def __init__(self, cin, cout, layers, groups, add_upsample, **kw):
    self.resnets = nnx.List(
        [
            ResnetBlock2D(cin if i == 0 else cout, cout, None, groups, _EPS, **kw)
            for i in range(layers)
        ]
    )
    self.upsamplers = nnx.List([Upsample2D(cout, **kw)]) if add_upsample else None

  def __call__(self, x):
    for r in self.resnets:
      x = r(x)
    return self.upsamplers[0](x) if self.upsamplers is not None else x


class _MidBlock(nnx.Module):
  """ResNet, single-head self-attention over all pixels (with GroupNorm + residual), ResNet."""

  def __init__(self, ch, groups, add_attention, **kw):
    self.resnets = nnx.List([ResnetBlock2D(ch, ch, None, groups, _EPS, **kw) for _ in range(2)])
    self.attentions = (
        nnx.List(
            [Attention(ch, 1, ch, qkv_bias=True, group_norm_groups=groups, norm_eps=_EPS, **kw)]
        )
        if add_attention
        else None
    )

  def __call__(self, x):
    x = self.resnets[0](x)
    if self.attentions is not None:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class Encoder(nnx.Module):

  def __init__(self, cfg: VAEConfig, **kw):
    ch = cfg.block_out_channels
    self.conv_in = conv(cfg.in_channels, ch[0], **kw)
    self.down_blocks = nnx.List(
        [
            _EncoderBlock(
                ch[max(i - 1, 0)],
                ch[i],
                cfg.layers_per_block,
                cfg.norm_num_groups,
                i < len(ch) - 1,
                **kw,
            )
            for i in range(len(ch))
        ]
    )
    self.mid_block = _MidBlock(ch[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, **kw)
    self.conv_norm_out = group_norm(ch[-1], cfg.norm_num_groups, _EPS, **kw)
    self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, **kw)

  def __call__(self, x):
    x = self.conv_in(x)
    for b in self.down_blocks:
      x = b(x)
    x = self.mid_block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):

  def __init__(self, cfg: VAEConfig, **kw):
    rev = cfg.block_out_channels[::-1]
    self.conv_in = conv(cfg.latent_channels, rev[0], **kw)
    self.mid_block = _MidBlock(rev[0], cfg.norm_num_groups, cfg.mid_block_add_attention, **kw)
    self.up_blocks = nnx.List(
        [
            _DecoderBlock(
                rev[max(i - 1, 0)],
                rev[i],
                cfg.layers_per_block + 1,
                cfg.norm_num_groups,
                i < len(rev) - 1,
                **kw,
            )
            for i in range(len(rev))
        ]
    )
    self.conv_norm_out = group_norm(rev[-1], cfg.norm_num_groups, _EPS, **kw)
    self.conv_out = conv(rev[-1], cfg.out_channels, **kw)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for b in self.up_blocks:
      x = b(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


@dataclasses.dataclass
class DiagonalGaussian:
  """The encoder's posterior; `logvar` clipped to [-30, 20] as in diffusers."""

  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments):
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self):
    return jnp.exp(0.5 * self.logvar)

  def mode(self):
    return self.mean

  def sample(self, key):
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)


class AutoencoderKL(nnx.Module):
  """`encode(images) -> DiagonalGaussian`, `decode(latents) -> images` (unscaled latents).

  `scale_latents`/`unscale_latents` apply the config's scaling (0.18215 for SD 1.x) that the U-Net
  sees: the diffusion model works on `scale_latents(posterior.sample())`.
  """

  def __init__(
      self, config: VAEConfig | dict, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
  ):
    cfg = config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config)
    self.config = cfg
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    lat = cfg.latent_channels
    self.encoder = Encoder(cfg, **kw)
    self.decoder = Decoder(cfg, **kw)
    self.quant_conv = conv(2 * lat, 2 * lat, 1, padding=0, **kw) if cfg.use_quant_conv else None
    self.post_quant_conv = conv(lat, lat, 1, padding=0, **kw) if cfg.use_post_quant_conv else None

  def encode(self, images) -> DiagonalGaussian:
    moments = self.encoder(images)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

  def decode(self, latents):
    if self.post_quant_conv is not None:
      latents = self.post_quant_conv(latents)
    return self.decoder(latents)

  def scale_latents(self, z):
    return (z - self.config.shift_factor) * self.config.scaling_factor

  def unscale_latents(self, z):
    return z / self.config.scaling_factor + self.config.shift_factor

  def __call__(self, images, key=None):
    post = self.encode(images)
    return self.decode(post.sample(key) if key is not None else post.mode())
