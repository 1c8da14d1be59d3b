"""CLIP vision tower and projector weights: transformers state dicts and model folders.

The tower's names are the CLIP checkpoints' (`vision_model.embeddings.patch_embedding.weight`, ...).
transformers 5 saves a `CLIPVisionModel` without the `vision_model.` prefix; both forms load. A whole
`CLIPModel` checkpoint (the `openai/clip-vit-large-patch14` folder LLaVA takes its tower from) loads
too: its text tower and projections are left out by name, as `CLIPVisionModel.from_pretrained`
does. Exports carry the prefix, which every transformers version reads. The projector is LLaVA's
`mm_projector` (`model.mm_projector.*` in LLaVA checkpoints; pass that prefix).
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mre.model_io.safetensors_io import read_state_dict, write_safetensors
from mre.model_io.torch_state_dict import load_state_dict, materialize_non_params, state_dict
from mre.models.clip_vision import CLIPVisionConfig, CLIPVisionModel
from mre.models.config import read_json

PREFIX = "vision_model."
PROJECTOR_PREFIX = "mm_projector."
_BUFFERS = ("position_ids",)
# The parts of a CLIPModel checkpoint that are not the vision tower.
_CLIP_MODEL_OTHERS = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")


def _with_prefix(name: str) -> str:
  return name if name.startswith(PREFIX) else PREFIX + name


def _vision_part(tensors: dict, prefix: str) -> dict:
  """The tensors under `prefix`, without a CLIPModel's text tower and projections."""
  out = {}
  for k, v in tensors.items():
    if not k.startswith(prefix):
      continue
    if not k[len(prefix) :].startswith(_CLIP_MODEL_OTHERS):
      out[k[len(prefix) :]] = v
  return out


def load_clip_vision(
    model: CLIPVisionModel, tensors: dict, *, where: str = "CLIP vision tower", prefix: str = ""
):
  """Copies a `CLIPVisionModel` or `CLIPModel` state dict (names under `prefix`) into `model`;
  every missing, unexpected or mis-shaped tensor is named in one `WeightsError`."""
  load_state_dict(
      model,
      _vision_part(tensors, prefix),
      where=f"{where} ({prefix}*)" if prefix else where,
      ignore=_BUFFERS,
      rename=_with_prefix,
  )
  return model


def clip_vision_state_dict(model: CLIPVisionModel, *, prefix: str = "", dtype=np.float32) -> dict:
  """The tower's tensors in PyTorch layout, named `{prefix}vision_model.*`."""
  return state_dict(model, prefix=prefix, dtype=dtype)


def load_clip_vision_folder(
    folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, remat=()
) -> CLIPVisionModel:
  """A transformers `CLIPVisionModel` or `CLIPModel` folder (config.json + weights)."""
  cfg = CLIPVisionConfig.from_dict(read_json(folder))
  model = nnx.eval_shape(
      lambda: CLIPVisionModel(
          cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0)
      )
  )
  load_clip_vision(model, read_state_dict(folder), where=f"CLIP vision tower in {folder}")
  return materialize_non_params(model)


def save_clip_vision_folder(model: CLIPVisionModel, folder: str):
  """config.json + model.safetensors that `transformers.CLIPVisionModel.from_pretrained` opens."""
  raw = model.config.raw
  if raw is None:
    raise ValueError("CLIPVisionModel was built without a config dict; cannot export")
  os.makedirs(folder, exist_ok=True)
  cfg = {k: v for k, v in raw.items() if not k.startswith("_")}
  cfg.update(architectures=["CLIPVisionModel"], model_type="clip_vision_model")
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
  write_safetensors(
      os.path.join(folder, "model.safetensors"),
      clip_vision_state_dict(model),
      metadata={"format": "pt"},
  )


def load_projector(
    projector: nnx.Linear,
    tensors: dict,
    *,
    where: str = "mm_projector",
    prefix: str = PROJECTOR_PREFIX,
):
  """Copies `{prefix}weight` / `{prefix}bias` into the projector; other names are not looked at."""
  load_state_dict(projector, tensors, where=where, prefix=prefix)
  return projector


def projector_state_dict(
    projector: nnx.Linear, *, prefix: str = PROJECTOR_PREFIX, dtype=np.float32
) -> dict:
  return state_dict(projector, prefix=prefix, dtype=dtype)
