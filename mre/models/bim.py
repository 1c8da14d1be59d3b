"""SmartEdit's bidirectional interaction module (BIM): the Q-Former output and the CLIP image
patches exchange information through SAM's two-way transformer; NHWC layout throughout.

The Q-Former output [B, T, Dq] goes through `modulate_head` to the BIM width and becomes the token
input (it doubles as the tokens' positional term); the image patches [B, N, width] (N = g*g) are the
image input, with SAM's random-Fourier positional encoding of the g x g grid. Outputs:
- the U-Net context `qformer_out + token_weight * token_out` (`token_out` from the zero-initialised
  `dimension_reduction_head_qformer_out`), so at initialisation the context is the Q-Former output;
- a [B, h, w, conv_in channels] map (bilinear resize of the image tokens to the latent size, then
  the zero-initialised 1x1 `dimension_reduction_head_zeroconv`) that the caller adds to the U-Net's
  `conv_in` output.

Attribute names are the release's (`modulate_head`, `modulate_transformer.layers.i.norm1`, ...), so
a parameter's NNX path is its name in the released `modulate-*/adapter_model.bin`;
`mre/model_io/bim_weights.py` reads and writes that file.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mre.models.layers import linear, maybe_remat


class Buffer(nnx.Variable):
  """A tensor stored with the weights but never trained (a PyTorch buffer): the trainer optimises
  `nnx.Param` only."""


@dataclasses.dataclass(frozen=True)
class BIMConfig:
  """Sizes of the BIM; the defaults are the release's (SD 1.5 U-Net, CLIP ViT-L/14 patches)."""

  qformer_dim: int = 768  # Q-Former width = U-Net context width
  width: int = 1024  # BIM width = CLIP vision width (the image tokens enter unprojected)
  depth: int = 2
  heads: int = 8
  mlp_dim: int = 2048
  attention_downsample_rate: int = 2  # the cross-attentions work at width / rate
  conv_in_channels: int = 320  # the U-Net's conv_in output channels
  layer_norm_eps: float = 1e-5
  pe_scale: float = 1.0  # std of the random Fourier matrix
  token_weight: float = 0.5  # context = qformer_out + token_weight * token_out

  @classmethod
  def from_dict(cls, cfg: dict) -> "BIMConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - names)
    if unknown:
      raise ValueError(f"BIM config: unknown key(s) {unknown} (known: {sorted(names)})")
    return cls(**cfg)


class SamAttention(nnx.Module):
  """SAM's attention: q/k/v projected down to width / downsample_rate, heads, out_proj back."""

  def __init__(self, dim, heads, downsample_rate=1, **kw):
    inner = dim // downsample_rate
    if inner % heads:
      raise ValueError(f"SamAttention: {heads} heads do not divide the inner width {inner}")
    self.heads, self.head_dim = heads, inner // heads
    self.q_proj, self.k_proj = linear(dim, inner, **kw), linear(dim, inner, **kw)
    self.v_proj, self.out_proj = linear(dim, inner, **kw), linear(inner, dim, **kw)

  def __call__(self, q, k, v):
    split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim)  # noqa: E731
    q, k, v = split(self.q_proj(q)), split(self.k_proj(k)), split(self.v_proj(v))
    out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype))
    return self.out_proj(out.reshape(out.shape[0], out.shape[1], -1))


class MLPBlock(nnx.Module):

  def __init__(self, dim, hidden, **kw):
    self.lin1, self.lin2 = linear(dim, hidden, **kw), linear(hidden, dim, **kw)

  def __call__(self, x):
    return self.lin2(jax.nn.relu(self.lin1(x)))


class TwoWayAttentionBlock(nnx.Module):
  """Token self-attention, tokens -> image, token MLP, image -> tokens; post-norm after each.

  The first block's self-attention has neither the positional term nor the residual (SAM's
  `skip_first_layer_pe`)."""

  def __init__(self, cfg: BIMConfig, skip_first_layer_pe: bool, **kw):
    ln = lambda: nnx.LayerNorm(  # noqa: E731
        cfg.width, epsilon=cfg.layer_norm_eps, use_fast_variance=False, **kw
    )
    rate = cfg.attention_downsample_rate
    self.skip_first_layer_pe = skip_first_layer_pe
    self.self_attn = SamAttention(cfg.width, cfg.heads, 1, **kw)
    self.norm1 = ln()
    self.cross_attn_token_to_image = SamAttention(cfg.width, cfg.heads, rate, **kw)
    self.norm2 = ln()
    self.mlp = MLPBlock(cfg.width, cfg.mlp_dim, **kw)
    self.norm3 = ln()
    self.norm4 = ln()
    self.cross_attn_image_to_token = SamAttention(cfg.width, cfg.heads, rate, **kw)

  def __call__(self, queries, keys, query_pe, key_pe):
    if self.skip_first_layer_pe:
      queries = self.self_attn(queries, queries, queries)
    else:
      q = queries + query_pe
      queries = queries + self.self_attn(q, q, queries)
    queries = self.norm1(queries)
    q, k = queries + query_pe, keys + key_pe
    queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
    queries = self.norm3(queries + self.mlp(queries))
    q = queries + query_pe
    keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
    return queries, keys


def _block_call(block, queries, keys, query_pe, key_pe):
  return block(queries, keys, query_pe, key_pe)


class TwoWayTransformer(nnx.Module):
  """SAM's two-way transformer: `__call__(image [B, N, C], image_pe [B|1, N, C], tokens [B, T, C])
  -> (tokens [B, T, C], image [B, N, C])`; the tokens are their own positional term."""

  def __init__(self, cfg: BIMConfig, *, remat=False, **kw):
    self.layers = nnx.List(
        [TwoWayAttentionBlock(cfg, skip_first_layer_pe=(i == 0), **kw) for i in range(cfg.depth)]
    )
    self.final_attn_token_to_image = SamAttention(
        cfg.width, cfg.heads, cfg.attention_downsample_rate, **kw
    )
    self.norm_final_attn = nnx.LayerNorm(
        cfg.width, epsilon=cfg.layer_norm_eps, use_fast_variance=False, **kw
    )
    self.block_call = maybe_remat(_block_call, remat)

  def __call__(self, image, image_pe, tokens):
    queries, keys = tokens, image
    for layer in self.layers:
      queries, keys = self.block_call(layer, queries, keys, tokens, image_pe)
    attn = self.final_attn_token_to_image(queries + tokens, keys + image_pe, keys)
    return self.norm_final_attn(queries + attn), keys


class PositionEmbeddingRandom(nnx.Module):
  """SAM's random-Fourier positional encoding of a grid: cell centres (i + 0.5) / n in [0, 1],
  mapped to [-1, 1], times a fixed Gaussian [2, width / 2] (x first), times 2 pi, then sin | cos."""

  def __init__(self, num_pos_feats, scale=1.0, *, dtype, param_dtype, rngs):
    self.dtype = dtype
    self.positional_encoding_gaussian_matrix = Buffer(
        scale * jax.random.normal(rngs.params(), (2, num_pos_feats), param_dtype)
    )

  def __call__(self, size):
    """[h, w, 2 * num_pos_feats] encoding of an h x w grid (float32 arithmetic)."""
    h, w = size
    y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    coords = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)  # [h, w, (x, y)]
    gauss = self.positional_encoding_gaussian_matrix[...].astype(jnp.float32)
    proj = 2 * math.pi * ((2 * coords - 1) @ gauss)
    return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1).astype(
        self.dtype or jnp.float32
    )


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of 1-D linear interpolation with PyTorch's `align_corners=False`
  (half-pixel centres, source index clamped at 0, no antialiasing when shrinking)."""
  scale = n_in / n_out
  src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m.astype(np.float32)


def resize_bilinear(x, size):
  """[B, H, W, C] -> [B, h, w, C] like `F.interpolate(mode="bilinear", align_corners=False)`.

  Two small matrix products: exact for shrinking too (jax.image.resize antialiases when it shrinks,
  PyTorch does not)."""
  rows = jnp.asarray(bilinear_matrix(x.shape[1], size[0]), x.dtype)
  cols = jnp.asarray(bilinear_matrix(x.shape[2], size[1]), x.dtype)
  x = jnp.einsum("oh,bhwc->bowc", rows, x)
  return jnp.einsum("pw,bowc->bopc", cols, x)


class BIM(nnx.Module):
  """`__call__(qformer_out [B, T, Dq], image_tokens [B, g*g, width], latent_size (h, w))
  -> (context [B, T, Dq], conv_in_residual [B, h, w, conv_in_channels])`."""

  def __init__(
      self,
      config: BIMConfig | dict = BIMConfig(),
      *,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      remat=False,
      rngs: nnx.Rngs,
  ):
    cfg = config if isinstance(config, BIMConfig) else BIMConfig.from_dict(config)
    if cfg.width % 2:
      raise ValueError(f"BIM width {cfg.width} must be even (sin | cos halves)")
    self.config = cfg
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.modulate_head = linear(cfg.qformer_dim, cfg.width, **kw)
    self.modulate_transformer = TwoWayTransformer(cfg, remat=remat, **kw)
    self.pe_layer = PositionEmbeddingRandom(cfg.width // 2, cfg.pe_scale, **kw)
    zeros = nnx.initializers.zeros
    self.dimension_reduction_head_zeroconv = nnx.Conv(
        cfg.width, cfg.conv_in_channels, (1, 1), kernel_init=zeros, bias_init=zeros, **kw
    )
    self.dimension_reduction_head_qformer_out = nnx.Linear(
        cfg.width, cfg.qformer_dim, kernel_init=zeros, bias_init=zeros, **kw
    )

  def __call__(self, qformer_out, image_tokens, latent_size):
    b, n, c = image_tokens.shape
    g = math.isqrt(n)
    if g * g != n or c != self.config.width:
      raise ValueError(
          f"BIM: image tokens {image_tokens.shape} are not [B, g*g, {self.config.width}]"
      )
    tokens = self.modulate_head(qformer_out)
    image_pe = self.pe_layer((g, g)).reshape(1, n, c).astype(image_tokens.dtype)
    token_out, image_out = self.modulate_transformer(image_tokens, image_pe, tokens)
    token_out = self.dimension_reduction_head_qformer_out(token_out)
    context = qformer_out + self.config.token_weight * token_out.astype(qformer_out.dtype)
    image_out = resize_bilinear(image_out.reshape(b, g, g, c), tuple(latent_size))
    return context, self.dimension_reduction_head_zeroconv(image_out)
