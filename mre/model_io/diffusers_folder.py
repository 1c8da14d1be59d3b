"""Diffusers-format model folders: loading them into our modules, and writing them back.

A pipeline folder holds `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/` and
`model_index.json`, as `StableDiffusionInstructPix2PixPipeline.save_pretrained` writes it; a
component folder holds `config.json` and its weights (`mre.model_io.safetensors_io`). Nothing is
downloaded: every path is a local folder. Besides the folders as diffusers writes them: SD 1.5's
legacy VAE attention names, and an SD 1.5 U-Net widened to InstructPix2Pix's 8 input channels.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mre.model_io import reward_layout
from mre.model_io.safetensors_io import read_state_dict, write_safetensors
from mre.model_io.torch_state_dict import load_state_dict, materialize_non_params, state_dict
from mre.models.clip_text import CLIPTextModel
from mre.models import pixel
from mre.models.config import CLIPTextConfig, UNetConfig, VAEConfig, read_json
from mre.models.reward_unet import RewardUNet
from mre.models.unet import UNet2DConditionModel
from mre.models.vae import AutoencoderKL
from mre.pipeline import Pipeline

DIFFUSERS_VERSION = "0.42.1"
TOKENIZER_MAX_LENGTH = 77
_CLIP_BUFFERS = ("position_ids",)


def _abstract(make):
  """Builds a module without spending time on random initialisation (weights come from disk)."""
  return nnx.eval_shape(make)


def load_unet(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, remat=()):
  """A U-Net folder; a `RewardUNet` when it holds reward modules (ours or the released ones)."""
  raw = read_json(folder)
  tensors = read_state_dict(folder)
  if reward_layout.has_reward(tensors, raw):
    return reward_layout.load_reward_unet(
        folder, dtype=dtype, param_dtype=param_dtype, remat=remat, tensors=tensors
    )
  cfg = UNetConfig.from_dict(raw)
  unet = _abstract(
      lambda: UNet2DConditionModel(
          cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0)
      )
  )
  load_state_dict(unet, tensors, where=f"U-Net in {folder}")
  return materialize_non_params(unet)


def load_vae(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32):
  raw = read_json(folder)
  if raw.get("_class_name") == pixel.CLASS_NAME:  # a toy editor's pixel space (`save_vae`)
    return pixel.PixelSpace({"channels": raw.get("channels", 3)}, dtype=dtype)
  cfg = VAEConfig.from_dict(raw)
  vae = _abstract(
      lambda: AutoencoderKL(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  )
  load_state_dict(vae, read_state_dict(folder), where=f"VAE in {folder}", rename=legacy_vae_rename)
  return materialize_non_params(vae)


def _clip_rename(name: str) -> str:
  # transformers 5 saves CLIPTextModel without the `text_model.` prefix that SD checkpoints have.
  return name if name.startswith("text_model.") else "text_model." + name


def load_text_encoder(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32):
  cfg = CLIPTextConfig.from_dict(read_json(folder))
  model = _abstract(
      lambda: CLIPTextModel(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  )
  load_state_dict(
      model,
      read_state_dict(folder),
      where=f"text encoder in {folder}",
      ignore=_CLIP_BUFFERS,
      rename=_clip_rename,
  )
  return materialize_non_params(model)


def load_tokenizer(folder: str):
  """transformers' CLIPTokenizer from a local folder, padded/truncated to its `model_max_length`
  (77 for CLIP; never more, since CLIP has 77 positions; the toy tokenizer asks for fewer)."""
  from transformers import CLIPTokenizer  # pylint: disable=import-outside-toplevel

  if not os.path.isdir(folder):
    raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
  tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
  tok.model_max_length = min(tok.model_max_length or TOKENIZER_MAX_LENGTH, TOKENIZER_MAX_LENGTH)
  return tok


def _sub(folder, name):
  path = os.path.join(folder, name)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder: it has no {name}/")
  return path


def load_pipeline(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, remat=(), unet=None):
  """All components of a pipeline folder; `unet`, when given, replaces the folder's U-Net."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"model folder {folder} does not exist")
  index_path = os.path.join(folder, "model_index.json")
  index = read_json(index_path) if os.path.exists(index_path) else {}
  sched_dir = _sub(folder, "scheduler")
  return Pipeline(
      unet=unet
      if unet is not None
      else load_unet(_sub(folder, "unet"), dtype=dtype, param_dtype=param_dtype, remat=remat),
      vae=load_vae(_sub(folder, "vae"), dtype=dtype, param_dtype=param_dtype),
      text_encoder=load_text_encoder(
          _sub(folder, "text_encoder"), dtype=dtype, param_dtype=param_dtype
      ),
      tokenizer=load_tokenizer(_sub(folder, "tokenizer")),
      scheduler_config=read_json(os.path.join(sched_dir, "scheduler_config.json")),
      model_index=index,
  )


# diffusers converts these pre-0.14 attention names on load; so do we (SD 1.5's own VAE uses them).
_LEGACY_ATTENTION = {
    "query.": "to_q.",
    "key.": "to_k.",
    "value.": "to_v.",
    "proj_attn.": "to_out.0.",
}


def legacy_vae_rename(name: str) -> str:
  """A VAE state-dict name with the pre-0.14 attention names (`query`, `proj_attn`, ...) renamed."""
  if ".attentions." not in name:
    return name
  head, _, tail = name.rpartition(".attentions.0.")
  for old, new in _LEGACY_ATTENTION.items():
    if tail.startswith(old):
      return f"{head}.attentions.0.{new}{tail[len(old):]}"
  return name


def widen_conv_in(tensors: dict, in_channels: int = 8) -> dict:
  """SD 1.5 -> InstructPix2Pix: `conv_in` takes [noisy latent | image latent]; new inputs start at 0."""
  w = tensors["conv_in.weight"]
  if w.shape[1] >= in_channels:
    raise ValueError(f"conv_in already has {w.shape[1]} input channels (asked for {in_channels})")
  pad = np.zeros((w.shape[0], in_channels - w.shape[1]) + w.shape[2:], w.dtype)
  return {**tensors, "conv_in.weight": np.concatenate([w, pad], axis=1)}


def ip2p_unet_from_sd15(
    folder: str, *, in_channels=8, dtype=jnp.float32, param_dtype=jnp.float32, remat=()
):
  """The stage-1 starting point: an SD 1.5 `unet/` folder with `conv_in` widened to 8 channels."""
  raw = {**read_json(folder), "in_channels": in_channels}
  unet = nnx.eval_shape(
      lambda: UNet2DConditionModel(
          raw, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0)
      )
  )
  load_state_dict(
      unet, widen_conv_in(read_state_dict(folder), in_channels), where=f"SD U-Net in {folder}"
  )
  return materialize_non_params(unet)


# --- export ---------------------------------------------------------------------------------------


def _write_config(folder, cfg: dict, class_name: str, library: str):
  os.makedirs(folder, exist_ok=True)
  cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
  if library == "diffusers":
    cfg = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **cfg}
  else:
    cfg = {"architectures": [class_name], "model_type": "clip_text_model", **cfg}
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)


def config_dict(module) -> dict:
  """The config.json content of a module (reward settings included for a RewardUNet)."""
  raw = module.config.raw
  if raw is None:
    raise ValueError(f"{type(module).__name__} was built without a config dict; cannot export")
  if isinstance(module, RewardUNet):
    return reward_layout.export_config(module)
  return raw


def mre_only_options(unet_config) -> list[str]:
  """The U-Net config keys of ours that diffusers has no counterpart for (set in this config)."""
  # each read from the key "mre_" + field
  fields = ("source_skip", "noisy_skip", "pixel_head", "self_condition")
  return [f"mre_{field}" for field in fields if getattr(unet_config, field, False)]


def save_unet(unet, folder: str):
  """Writes `config.json` + `diffusion_pytorch_model.safetensors` that diffusers loads as is."""
  ours = mre_only_options(unet.config)
  if ours:
    raise ValueError(
        f"this U-Net uses {', '.join(ours)} (ours: mre/diffusion/source_skip.py, "
        "mre/models/unet.py), which diffusers' UNet2DConditionModel and pipelines do not have: a "
        "diffusers folder would edit differently; keep the mre export (mre.edit, mre.eval load it)"
    )
  _write_config(folder, config_dict(unet), "UNet2DConditionModel", "diffusers")
  write_safetensors(
      os.path.join(folder, "diffusion_pytorch_model.safetensors"),
      state_dict(unet),
      metadata={"format": "pt"},
  )


def save_vae(vae, folder: str):
  """An AutoencoderKL's config.json and weights; a `PixelSpace` (no weights) writes its config
  only, which `load_vae` reads back (diffusers itself cannot open it)."""
  if isinstance(vae, pixel.PixelSpace):
    _write_config(folder, vae.config.raw, pixel.CLASS_NAME, "diffusers")
    return
  _write_config(folder, config_dict(vae), "AutoencoderKL", "diffusers")
  write_safetensors(
      os.path.join(folder, "diffusion_pytorch_model.safetensors"),
      state_dict(vae),
      metadata={"format": "pt"},
  )


def save_text_encoder(model, folder: str):
  _write_config(folder, config_dict(model), "CLIPTextModel", "transformers")
  write_safetensors(
      os.path.join(folder, "model.safetensors"), state_dict(model), metadata={"format": "pt"}
  )


def save_pipeline(pipe: Pipeline, folder: str, *, scheduler_class: Optional[str] = None):
  """A folder that `StableDiffusionInstructPix2PixPipeline.from_pretrained` opens."""
  os.makedirs(folder, exist_ok=True)
  save_unet(pipe.unet, os.path.join(folder, "unet"))
  save_vae(pipe.vae, os.path.join(folder, "vae"))
  save_text_encoder(pipe.text_encoder, os.path.join(folder, "text_encoder"))
  pipe.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
  sched = dict(pipe.scheduler_config)
  scheduler_class = (
      scheduler_class
      or sched.get("_class_name")
      or pipe.model_index.get("scheduler", [None, "EulerAncestralDiscreteScheduler"])[1]
  )
  sched["_class_name"] = scheduler_class
  os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
  with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(sched, f, indent=2, sort_keys=True)
  index = {
      "_class_name": "StableDiffusionInstructPix2PixPipeline",
      "_diffusers_version": DIFFUSERS_VERSION,
      "feature_extractor": [None, None],
      "safety_checker": [None, None],
      "image_encoder": [None, None],
      "requires_safety_checker": False,
      "scheduler": ["diffusers", scheduler_class],
      "text_encoder": ["transformers", "CLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"],
  }
  with open(os.path.join(folder, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)
