"""Pixel space behind the autoencoder interface, for the toy world's tiny editors.

At 24-32 px there is nothing to compress, and training an autoencoder first would cost the CPU budget
the editor needs. `PixelSpace` lets the same trainer, sampler and `Editor` run on pixels: the
"latent" is the image itself (posterior with zero variance, scaling factor 1).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from mre.models.vae import DiagonalGaussian

CLASS_NAME = "PixelSpace"


@dataclasses.dataclass(frozen=True)
class PixelSpaceConfig:
  channels: int = 3
  scaling_factor: float = 1.0
  shift_factor: float = 0.0

  @property
  def latent_channels(self):
    return self.channels

  @property
  def block_out_channels(self):  # no downsampling: edge lengths need no extra multiple
    return (self.channels,)

  @property
  def raw(self):
    return {"_class_name": CLASS_NAME, "channels": self.channels}


class PixelSpace(nnx.Module):

  def __init__(self, config=None, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs=None):
    del param_dtype, rngs  # no parameters
    cfg = dict(config or {})
    cfg.pop("_class_name", None)
    self.config = PixelSpaceConfig(**cfg)
    self.dtype = dtype

  def encode(self, images) -> DiagonalGaussian:
    images = jnp.asarray(images, jnp.float32)
    return DiagonalGaussian(images, jnp.full_like(images, -30.0))  # std ~3e-7: mode == sample

  def decode(self, latents):
    return latents

  def scale_latents(self, z):
    return z

  def unscale_latents(self, z):
    return z
