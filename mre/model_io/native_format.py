"""Our own model format, an "mre checkpoint": Orbax parameters and the diffusers configs.

Layout: `mre_model.json` (format version, component configs, scheduler config, model index),
`tokenizer/` (transformers files) and `params/` (an Orbax checkpoint of `{unet, vae,
text_encoder}` parameter trees). Unlike a diffusers folder, Orbax restores each array straight
into its target sharding, which matters on TPU pods.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from mre.model_io import reward_layout
from mre.model_io.diffusers_folder import config_dict, load_tokenizer
from mre.model_io.torch_state_dict import materialize_non_params
from mre.models import pixel
from mre.models.clip_text import CLIPTextModel
from mre.models.unet import UNet2DConditionModel
from mre.models.vae import AutoencoderKL
from mre.pipeline import Pipeline

FORMAT_VERSION = 1
MARKER = "mre_model.json"
_CLASSES = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}


def is_native(folder: str) -> bool:
  return os.path.exists(os.path.join(folder, MARKER))


def save_native(pipe: Pipeline, folder: str):
  folder = os.path.abspath(folder)
  os.makedirs(folder, exist_ok=True)
  modules = {name: getattr(pipe, name) for name in _CLASSES}
  params = {n: nnx.to_pure_dict(nnx.state(m, nnx.Param)) for n, m in modules.items()}
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(folder, "params"), params, force=True)
  ckpt.wait_until_finished()
  pipe.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
  meta = {
      "format_version": FORMAT_VERSION,
      "configs": {n: config_dict(m) for n, m in modules.items()},
      "scheduler_config": pipe.scheduler_config,
      "model_index": pipe.model_index,
  }
  with open(os.path.join(folder, MARKER), "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)


def load_native(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, remat=()):
  folder = os.path.abspath(folder)
  if not is_native(folder):
    raise FileNotFoundError(f"{folder} is not an mre checkpoint (no {MARKER})")
  with open(os.path.join(folder, MARKER)) as f:
    meta = json.load(f)
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(
        f"{folder}: checkpoint format {meta.get('format_version')} is not " f"{FORMAT_VERSION}"
    )
  modules = {}
  for name, cls in _CLASSES.items():
    cfg, extra = meta["configs"][name], {"remat": remat} if name == "unet" else {}
    if name == "unet" and reward_layout.CONFIG_KEY in cfg:
      cls = reward_layout.reward_unet_from_config
    if name == "vae" and cfg.get("_class_name") == pixel.CLASS_NAME:
      cls = pixel.PixelSpace
    modules[name] = nnx.eval_shape(
        lambda cls=cls, cfg=cfg, extra=extra: cls(
            cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0), **extra
        )
    )
  states = {n: nnx.state(m, nnx.Param) for n, m in modules.items()}
  target = {n: nnx.to_pure_dict(s) for n, s in states.items()}
  restored = ocp.StandardCheckpointer().restore(os.path.join(folder, "params"), target)
  for name, module in modules.items():
    nnx.replace_by_pure_dict(states[name], restored[name])
    nnx.update(module, states[name])
    materialize_non_params(module)
  return Pipeline(
      tokenizer=load_tokenizer(os.path.join(folder, "tokenizer")),
      scheduler_config=meta["scheduler_config"],
      model_index=meta["model_index"],
      **modules,
  )
