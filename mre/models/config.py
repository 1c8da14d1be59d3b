"""Reading diffusers/transformers `config.json` files into validated, normalised settings.

Structural keys must be present (a config without them is not the model it claims to be); other
keys take the library defaults. Values we do not implement are refused by name rather than ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


class ConfigError(ValueError):
  """A model config.json is missing a key or asks for something this implementation lacks."""


def read_json(path: str) -> dict:
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config file at {path}")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path} is not valid JSON: {e}") from e


def require(cfg: dict, keys, where: str):
  missing = [k for k in keys if k not in cfg]
  if missing:
    raise ConfigError(f"{where}: config.json lacks required key(s) {missing}")


def refuse(cfg: dict, key: str, allowed, where: str, default=None):
  value = cfg.get(key, default)
  if value not in allowed:
    raise ConfigError(
        f"{where}: config key {key}={value!r} is not supported (supported: {allowed})"
    )
  return value


def per_block(value, n: int, key: str, where: str):
  """diffusers lets many U-Net keys be one value or a list with one entry per block."""
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ConfigError(f"{where}: {key} has {len(value)} entries for {n} blocks")
    return tuple(value)
  return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  in_channels: int
  out_channels: int
  block_out_channels: tuple
  down_block_types: tuple
  up_block_types: tuple
  layers_per_block: tuple
  heads: tuple  # attention heads per down block
  transformer_layers: tuple
  cross_attention_dim: int
  # Per down block (mirrored in the up blocks): attn1 attends to the context too. diffusers'
  # UNetMidBlock2DCrossAttn ignores it (and `mid_block_only_cross_attention`): its attn1 stays
  # self-attention.
  only_cross_attention: tuple = ()
  addition_embed_type: str | None = None  # None, or "text": the pooled context joins the time
  addition_embed_type_num_heads: int = 64  # embedding (TextTimeEmbedding)
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  use_linear_projection: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  has_mid_block: bool = True
  center_input_sample: bool = False
  resnet_time_scale_shift: str = "default"  # "scale_shift": FiLM of the time embedding
  # Ours, not diffusers': the denoiser is parameterised relative to the source image
  # (mre/diffusion/source_skip.py); diffusers cannot run such a U-Net the same way.
  source_skip: bool = False
  # With the source skip and x0 ("sample") prediction: > 0 also skips the noisy edit residual to
  # the output, weighted by its signal-to-noise ratio (EDM's c_skip / c_out with this sigma_data).
  source_skip_sigma_data: float = 0.0
  # With the source skip and x0 prediction: the output also holds a per-pixel 3 x 3 colour matrix
  # applied to the source (out_channels = 3 + 9 per latent channel group; see source_skip.py).
  source_skip_affine: bool = False
  # A learned, time-dependent gain on the noisy input added to the output (mre/models/unet.py).
  noisy_skip: bool = False
  # > 0: hidden width of a per-pixel MLP head reading the last features, the input pixel and the
  # time embedding, added to the output (mre/models/unet.py: PixelHead).
  pixel_head: int = 0
  # With pixel_head: the head is the whole output (no conv_out), so no 3 x 3 layer follows the
  # last point where the input pixel can gate the smooth features.
  pixel_head_only: bool = False
  # The input pixel's channels are multiplied by this before the head: a larger scale lets its
  # first layer draw sharp colour boundaries with small weights (Adam moves a weight ~lr a step).
  pixel_head_input_scale: float = 1.0
  # With pixel_head: > 0 adds sin/cos(2^k pi x) of the input pixel, k < this, to the head's input
  # (Fourier features: an MLP then learns sharp functions of colour, Tancik et al. 2020)
  pixel_head_fourier: int = 0
  # With pixel_head: the head gives one more channel, a gate g = sigmoid(that channel), and its
  # output is g times the other channels' (an edit = "where" x "what"; a saturated gate is exactly
  # 0 or 1, so the product keeps sharp boundaries that an additive output must cancel to draw).
  pixel_head_gate: bool = False
  # With pixel_head: > 0 gives the head's hidden layer a single-head cross-attention over the
  # instruction tokens of this width (its output projection zero-initialised), so each pixel can
  # test its own colour and features against the words, not only against the pooled instruction
  # that the time embedding adds everywhere alike.
  pixel_head_text_attention: int = 0
  # Self-conditioning (Analog Bits): the U-Net also reads an earlier x0 estimate of its own (in the
  # noisy latents' channels, appended to its input; zeros when there is none).
  self_condition: bool = False
  raw: Any = dataclasses.field(default=None, compare=False, repr=False)

  @classmethod
  def from_dict(cls, cfg: dict) -> "UNetConfig":
    where = "UNet2DConditionModel"
    require(
        cfg,
        [
            "in_channels",
            "out_channels",
            "block_out_channels",
            "down_block_types",
            "up_block_types",
            "cross_attention_dim",
        ],
        where,
    )
    n = len(cfg["block_out_channels"])
    if len(cfg["down_block_types"]) != n or len(cfg["up_block_types"]) != n:
      raise ConfigError(
          f"{where}: down_block_types/up_block_types must have {n} entries "
          "(one per block_out_channels)"
      )
    for t in cfg["down_block_types"]:
      refuse({"t": t}, "t", ("CrossAttnDownBlock2D", "DownBlock2D"), where + " down_block_types")
    for t in cfg["up_block_types"]:
      refuse({"t": t}, "t", ("CrossAttnUpBlock2D", "UpBlock2D"), where + " up_block_types")
    mid = refuse(
        cfg, "mid_block_type", ("UNetMidBlock2DCrossAttn", None), where, "UNetMidBlock2DCrossAttn"
    )
    refuse(cfg, "act_fn", ("silu",), where, "silu")
    refuse(cfg, "resnet_time_scale_shift", ("default", "scale_shift"), where, "default")
    refuse(cfg, "time_embedding_type", ("positional",), where, "positional")
    refuse(cfg, "class_embed_type", (None,), where)
    refuse(cfg, "encoder_hid_dim", (None,), where)
    refuse(cfg, "addition_embed_type", (None, "text"), where)
    refuse(cfg, "dual_cross_attention", (False,), where, False)
    refuse(cfg, "dropout", (0, 0.0), where, 0.0)
    refuse(cfg, "conv_in_kernel", (3,), where, 3)
    refuse(cfg, "conv_out_kernel", (3,), where, 3)
    if isinstance(cfg["cross_attention_dim"], (list, tuple)):
      raise ConfigError(f"{where}: per-block cross_attention_dim is not supported")
    for key in (
        "mre_pixel_head_only",
        "mre_pixel_head_fourier",
        "mre_pixel_head_gate",
        "mre_pixel_head_text_attention",
    ):
      if cfg.get(key, False) and not cfg.get("mre_pixel_head", 0):
        raise ConfigError(f"{where}: {key} needs mre_pixel_head > 0 (its width)")
    # diffusers' historical naming: `attention_head_dim` holds the number of heads when
    # `num_attention_heads` is unset (true of every SD 1.x config).
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    only_cross = cfg.get("only_cross_attention", False)
    return cls(
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        block_out_channels=tuple(cfg["block_out_channels"]),
        down_block_types=tuple(cfg["down_block_types"]),
        up_block_types=tuple(cfg["up_block_types"]),
        layers_per_block=per_block(cfg.get("layers_per_block", 2), n, "layers_per_block", where),
        heads=per_block(heads, n, "attention_head_dim", where),
        transformer_layers=per_block(
            cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block", where
        ),
        cross_attention_dim=cfg["cross_attention_dim"],
        only_cross_attention=tuple(
            bool(v) for v in per_block(only_cross, n, "only_cross_attention", where)
        ),
        addition_embed_type=cfg.get("addition_embed_type"),
        addition_embed_type_num_heads=cfg.get("addition_embed_type_num_heads", 64),
        norm_num_groups=cfg.get("norm_num_groups", 32),
        norm_eps=cfg.get("norm_eps", 1e-5),
        use_linear_projection=cfg.get("use_linear_projection", False),
        flip_sin_to_cos=cfg.get("flip_sin_to_cos", True),
        freq_shift=cfg.get("freq_shift", 0),
        downsample_padding=cfg.get("downsample_padding", 1),
        mid_block_scale_factor=cfg.get("mid_block_scale_factor", 1.0),
        has_mid_block=mid is not None,
        center_input_sample=cfg.get("center_input_sample", False),
        resnet_time_scale_shift=cfg.get("resnet_time_scale_shift") or "default",
        source_skip=bool(cfg.get("mre_source_skip", False)),
        source_skip_sigma_data=float(cfg.get("mre_source_skip_sigma_data", 0.0)),
        source_skip_affine=bool(cfg.get("mre_source_skip_affine", False)),
        noisy_skip=bool(cfg.get("mre_noisy_skip", False)),
        pixel_head=int(cfg.get("mre_pixel_head", 0)),
        pixel_head_only=bool(cfg.get("mre_pixel_head_only", False)),
        pixel_head_input_scale=float(cfg.get("mre_pixel_head_input_scale", 1.0)),
        pixel_head_fourier=int(cfg.get("mre_pixel_head_fourier", 0)),
        pixel_head_gate=bool(cfg.get("mre_pixel_head_gate", False)),
        pixel_head_text_attention=int(cfg.get("mre_pixel_head_text_attention", 0)),
        self_condition=bool(cfg.get("mre_self_condition", False)),
        raw=dict(cfg),
    )


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int
  out_channels: int
  latent_channels: int
  block_out_channels: tuple
  layers_per_block: int
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  raw: Any = dataclasses.field(default=None, compare=False, repr=False)

  @classmethod
  def from_dict(cls, cfg: dict) -> "VAEConfig":
    where = "AutoencoderKL"
    require(cfg, ["in_channels", "out_channels", "latent_channels", "block_out_channels"], where)
    n = len(cfg["block_out_channels"])
    for key, ok in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
      types = cfg.get(key, [ok] * n)
      if list(types) != [ok] * n:
        raise ConfigError(f"{where}: {key}={types} is not supported (only {ok} x {n})")
    refuse(cfg, "act_fn", ("silu",), where, "silu")
    refuse(cfg, "norm_type", ("group",), where, "group")
    return cls(
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        latent_channels=cfg["latent_channels"],
        block_out_channels=tuple(cfg["block_out_channels"]),
        layers_per_block=cfg.get("layers_per_block", 1),
        norm_num_groups=cfg.get("norm_num_groups", 32),
        scaling_factor=cfg.get("scaling_factor", 0.18215),
        shift_factor=cfg.get("shift_factor") or 0.0,
        use_quant_conv=cfg.get("use_quant_conv", True),
        use_post_quant_conv=cfg.get("use_post_quant_conv", True),
        mid_block_add_attention=cfg.get("mid_block_add_attention", True),
        raw=dict(cfg),
    )


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  max_position_embeddings: int = 77
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  eos_token_id: int = 2
  raw: Any = dataclasses.field(default=None, compare=False, repr=False)

  @classmethod
  def from_dict(cls, cfg: dict) -> "CLIPTextConfig":
    where = "CLIPTextModel"
    cfg = cfg.get("text_config", cfg) if "text_config" in cfg and "vocab_size" not in cfg else cfg
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
    act = refuse(cfg, "hidden_act", ("quick_gelu", "gelu"), where, "quick_gelu")
    return cls(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        max_position_embeddings=cfg.get("max_position_embeddings", 77),
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
        hidden_act=act,
        eos_token_id=cfg.get("eos_token_id", 2),
        raw=dict(cfg),
    )
