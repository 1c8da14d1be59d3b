"""Loading diffusers-format model folders into our modules, and writing them back.

A pipeline folder holds `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/` and
`model_index.json`, as `StableDiffusionInstructPix2PixPipeline.save_pretrained` writes it. Nothing is
downloaded: every path is a local folder.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax.numpy as jnp
from flax import nnx

from mre.models import reward_unet, weights
from mre.models.clip_text import CLIPTextModel
from mre.models.config import CLIPTextConfig, UNetConfig, VAEConfig, read_json
from mre.models.unet import UNet2DConditionModel
from mre.models.vae import AutoencoderKL, legacy_vae_rename

DIFFUSERS_VERSION = "0.42.1"
TOKENIZER_MAX_LENGTH = 77
_CLIP_BUFFERS = ("position_ids",)


def _abstract(make):
  """Builds a module without spending time on random initialisation (weights come from disk)."""
  return nnx.eval_shape(make)


def load_unet(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, remat=()):
  """A U-Net folder; a `RewardUNet` when it holds reward modules (ours or the released ones)."""
  raw = read_json(folder)
  tensors = weights.read_state_dict(folder)
  if reward_unet.has_reward(tensors, raw):
    return reward_unet.load_reward_unet(folder, dtype=dtype, param_dtype=param_dtype,
                                        remat=remat, tensors=tensors)
  cfg = UNetConfig.from_dict(raw)
  unet = _abstract(lambda: UNet2DConditionModel(cfg, dtype=dtype, param_dtype=param_dtype,
                                                remat=remat, rngs=nnx.Rngs(0)))
  weights.load_state_dict(unet, tensors, where=f"U-Net in {folder}")
  return weights.materialize_non_params(unet)


def load_vae(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32):
  cfg = VAEConfig.from_dict(read_json(folder))
  vae = _abstract(lambda: AutoencoderKL(cfg, dtype=dtype, param_dtype=param_dtype,
                                        rngs=nnx.Rngs(0)))
  weights.load_state_dict(vae, weights.read_state_dict(folder), where=f"VAE in {folder}",
                          rename=legacy_vae_rename)
  return weights.materialize_non_params(vae)


def _clip_rename(name: str) -> str:
  # transformers 5 saves CLIPTextModel without the `text_model.` prefix that SD checkpoints have.
  return name if name.startswith("text_model.") else "text_model." + name


def load_text_encoder(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32):
  cfg = CLIPTextConfig.from_dict(read_json(folder))
  model = _abstract(lambda: CLIPTextModel(cfg, dtype=dtype, param_dtype=param_dtype,
                                          rngs=nnx.Rngs(0)))
  weights.load_state_dict(model, weights.read_state_dict(folder),
                          where=f"text encoder in {folder}", ignore=_CLIP_BUFFERS,
                          rename=_clip_rename)
  return weights.materialize_non_params(model)


def load_tokenizer(folder: str):
  """transformers' CLIPTokenizer from a local folder, padded/truncated to its `model_max_length`
  (77 for CLIP; never more, since CLIP has 77 positions; the toy tokenizer asks for fewer)."""
  from transformers import CLIPTokenizer  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
  tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
  tok.model_max_length = min(tok.model_max_length or TOKENIZER_MAX_LENGTH, TOKENIZER_MAX_LENGTH)
  return tok


def tokenize(tokenizer, texts):
  """Token ids [len(texts), 77] (int32) the way the SD pipelines tokenise prompts."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  ids = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length,
                  truncation=True, return_tensors="np").input_ids
  return np.asarray(ids, np.int32)


@dataclasses.dataclass
class Pipeline:
  """The pieces of an InstructPix2Pix-style editor loaded from one folder."""
  unet: Any
  vae: Any
  text_encoder: Any
  tokenizer: Any
  scheduler_config: dict
  model_index: dict


def _sub(folder, name):
  path = os.path.join(folder, name)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder: it has no {name}/")
  return path


def load_pipeline(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, remat=(),
                  unet=None):
  """All components of a pipeline folder; `unet`, when given, replaces the folder's U-Net."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"model folder {folder} does not exist")
  index_path = os.path.join(folder, "model_index.json")
  index = read_json(index_path) if os.path.exists(index_path) else {}
  sched_dir = _sub(folder, "scheduler")
  return Pipeline(
      unet=unet if unet is not None else load_unet(_sub(folder, "unet"), dtype=dtype,
                                                   param_dtype=param_dtype, remat=remat),
      vae=load_vae(_sub(folder, "vae"), dtype=dtype, param_dtype=param_dtype),
      text_encoder=load_text_encoder(_sub(folder, "text_encoder"), dtype=dtype,
                                     param_dtype=param_dtype),
      tokenizer=load_tokenizer(_sub(folder, "tokenizer")),
      scheduler_config=read_json(os.path.join(sched_dir, "scheduler_config.json")),
      model_index=index)


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
  if isinstance(module, reward_unet.RewardUNet):
    return reward_unet.export_config(module)
  return raw


def save_unet(unet, folder: str):
  """Writes `config.json` + `diffusion_pytorch_model.safetensors` that diffusers loads as is."""
  _write_config(folder, config_dict(unet), "UNet2DConditionModel", "diffusers")
  weights.write_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"),
                            weights.state_dict(unet), metadata={"format": "pt"})


def save_vae(vae, folder: str):
  _write_config(folder, config_dict(vae), "AutoencoderKL", "diffusers")
  weights.write_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"),
                            weights.state_dict(vae), metadata={"format": "pt"})


def save_text_encoder(model, folder: str):
  _write_config(folder, config_dict(model), "CLIPTextModel", "transformers")
  weights.write_safetensors(os.path.join(folder, "model.safetensors"), weights.state_dict(model),
                            metadata={"format": "pt"})


def save_pipeline(pipe: Pipeline, folder: str, *, scheduler_class: Optional[str] = None):
  """A folder that `StableDiffusionInstructPix2PixPipeline.from_pretrained` opens."""
  os.makedirs(folder, exist_ok=True)
  save_unet(pipe.unet, os.path.join(folder, "unet"))
  save_vae(pipe.vae, os.path.join(folder, "vae"))
  save_text_encoder(pipe.text_encoder, os.path.join(folder, "text_encoder"))
  pipe.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
  sched = dict(pipe.scheduler_config)
  scheduler_class = (scheduler_class or sched.get("_class_name")
                     or pipe.model_index.get("scheduler", [None, "EulerAncestralDiscreteScheduler"])[1])
  sched["_class_name"] = scheduler_class
  os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
  with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(sched, f, indent=2, sort_keys=True)
  index = {
      "_class_name": "StableDiffusionInstructPix2PixPipeline",
      "_diffusers_version": DIFFUSERS_VERSION,
      "feature_extractor": [None, None], "safety_checker": [None, None],
      "image_encoder": [None, None], "requires_safety_checker": False,
      "scheduler": ["diffusers", scheduler_class],
      "text_encoder": ["transformers", "CLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
  with open(os.path.join(folder, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)


