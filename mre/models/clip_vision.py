"""CLIP ViT vision tower (transformers' `CLIPVisionModel`) and the linear projector to an LLM's width.

Patch convolution, class token, learned positions, pre-LayerNorm, the CLIP encoder layers (shared
with the text tower) and the post-LayerNorm of the pooled class token. `__call__` returns every
hidden state, as `output_hidden_states=True` does, so a caller picks one: LLaVA-style editors take
layer -2 without the class token (`select_features`). Attribute names are the PyTorch ones, under
`vision_model.` as in CLIP checkpoints.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mre.models.clip_text import CLIPEncoderLayer
from mre.models.config import ConfigError, refuse, require
from mre.models.layers import linear, maybe_remat

REMAT_CHOICES = ("layer",)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  image_size: int
  patch_size: int
  num_channels: int = 3
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  raw: Any = dataclasses.field(default=None, compare=False, repr=False)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @classmethod
  def from_dict(cls, cfg: dict) -> "CLIPVisionConfig":
    """A `CLIPVisionConfig` dict, or a whole `CLIPConfig` one (its `vision_config`)."""
    where = "CLIPVisionModel"
    cfg = cfg["vision_config"] if "vision_config" in cfg else cfg
    require(
        cfg,
        [
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "image_size",
            "patch_size",
        ],
        where,
    )
    act = refuse(cfg, "hidden_act", ("quick_gelu", "gelu"), where, "quick_gelu")
    refuse(cfg, "attention_dropout", (0, 0.0), where, 0.0)
    for key in ("image_size", "patch_size"):
      if not isinstance(cfg[key], int):
        raise ConfigError(
            f"{where}: only square images and patches are supported ({key}={cfg[key]})"
        )
    if cfg["image_size"] % cfg["patch_size"]:
      raise ConfigError(
          f"{where}: image_size {cfg['image_size']} is not a multiple of patch_size "
          f"{cfg['patch_size']}"
      )
    return cls(
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        image_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        num_channels=cfg.get("num_channels", 3),
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
        hidden_act=act,
        raw=dict(cfg),
    )


class _Embeddings(nnx.Module):

  def __init__(self, cfg: CLIPVisionConfig, *, dtype, param_dtype, rngs):
    d, p = cfg.hidden_size, cfg.patch_size
    self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,), param_dtype) * d**-0.5)
    self.patch_embedding = nnx.Conv(
        cfg.num_channels,
        d,
        (p, p),
        strides=p,
        padding="VALID",
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )
    self.position_embedding = nnx.Embed(
        cfg.grid**2 + 1, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, pixels):
    patches = self.patch_embedding(pixels)  # [B, g, g, D]
    b, _, _, d = patches.shape
    cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (b, 1, d))
    x = jnp.concatenate([cls, patches.reshape(b, -1, d)], axis=1)
    return x + self.position_embedding.embedding[...].astype(x.dtype)[None]


class _Encoder(nnx.Module):

  def __init__(self, cfg, **kw):
    self.layers = nnx.List([CLIPEncoderLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])


class _VisionTransformer(nnx.Module):

  def __init__(self, cfg: CLIPVisionConfig, **kw):
    ln = lambda: nnx.LayerNorm(
        cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_fast_variance=False, **kw
    )
    self.embeddings = _Embeddings(cfg, **kw)
    self.pre_layrnorm = ln()  # sic: transformers' name
    self.encoder = _Encoder(cfg, **kw)
    self.post_layernorm = ln()


def _layer_call(layer, x):
  return layer(x, None)


class CLIPVisionModel(nnx.Module):
  """`__call__(pixels [B, H, W, C]) -> (hidden_states, pooled [B, D])`.

  `hidden_states` holds num_hidden_layers + 1 arrays [B, 1 + patches, D]: the pre-LayerNorm
  embeddings, then each layer's output (transformers' `hidden_states`). Under `jit`, layers after
  the one a caller keeps are dropped by the compiler.
  """

  def __init__(
      self,
      config: CLIPVisionConfig | dict,
      *,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      remat=(),
      rngs: nnx.Rngs,
  ):
    cfg = config if isinstance(config, CLIPVisionConfig) else CLIPVisionConfig.from_dict(config)
    bad = set(remat) - set(REMAT_CHOICES)
    if bad:
      raise ValueError(f"unknown remat block kind(s) {sorted(bad)}; choose from {REMAT_CHOICES}")
    self.config, self.dtype = cfg, dtype
    self.vision_model = _VisionTransformer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_call = maybe_remat(_layer_call, "layer" in remat)

  def __call__(self, pixels):
    cfg, vm = self.config, self.vision_model
    want = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if tuple(pixels.shape[1:]) != want:
      raise ValueError(
          f"CLIPVisionModel: input images are {pixels.shape[1:]}, the model takes {want}"
      )
    x = vm.pre_layrnorm(vm.embeddings(pixels.astype(self.dtype or pixels.dtype)))
    hidden = [x]
    for layer in vm.encoder.layers:
      x = self.layer_call(layer, x)
      hidden.append(x)
    return tuple(hidden), vm.post_layernorm(x[:, 0])


def select_features(hidden_states, layer: int = -2, drop_cls: bool = True):
  """One hidden state of `CLIPVisionModel`, without the class token by default: LLaVA's
  `mm_vision_select_layer=-2`, `mm_vision_select_feature="patch"` ([B, patches, D])."""
  x = hidden_states[layer]
  return x[:, 1:] if drop_cls else x


def mm_projector(vision_width: int, llm_width: int, *, dtype, param_dtype, rngs) -> nnx.Linear:
  """LLaVA-1's projector: one Linear from the vision width to the LLM width (`mm_projector.*`)."""
  return linear(vision_width, llm_width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
