"""transformers `LlamaForCausalLM` weights <-> our `mre.models.llama.LlamaForCausalLM`.

The names are transformers' own (`model.embed_tokens.weight`, `model.layers.N.self_attn.q_proj.weight`,
..., `model.norm.weight`, `lm_head.weight`), linear weights (out, in) there and (in, out) here.
Rotary `inv_freq` buffers, which older checkpoints saved, are recomputed from the config and
skipped on import. Loading names every missing, unexpected or mis-shaped tensor.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mre.model_io.safetensors_io import read_state_dict, write_safetensors
from mre.model_io.torch_state_dict import load_state_dict, materialize_non_params, state_dict
from mre.models.config import read_json
from mre.models.llama import LlamaConfig, LlamaForCausalLM

_BUFFERS = ("rotary_emb.inv_freq",)


def load_llama_state_dict(model: LlamaForCausalLM, tensors: dict, *, where: str = "LLaMA"):
  """Copies a `LlamaForCausalLM` state dict (numpy arrays) into `model` in place."""
  load_state_dict(model, tensors, where=where, ignore=_BUFFERS)
  return model


def llama_state_dict(model: LlamaForCausalLM, dtype=np.float32) -> dict[str, np.ndarray]:
  """The module's parameters under transformers' names and layouts (`dtype=None`: as stored)."""
  return state_dict(model, dtype=dtype)


def llama_from_state_dict(
    config: LlamaConfig | dict,
    tensors: dict,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    remat=(),
    where: str = "LLaMA",
) -> LlamaForCausalLM:
  """A model built without random initialisation, its parameters read from `tensors`."""
  model = nnx.eval_shape(
      lambda: LlamaForCausalLM(
          config, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0)
      )
  )
  load_llama_state_dict(model, tensors, where=where)
  return materialize_non_params(model)


def load_llama(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, remat=()):
  """A Hugging Face `LlamaForCausalLM` folder (config.json + safetensors, or .bin with torch)."""
  return llama_from_state_dict(
      read_json(folder),
      read_state_dict(folder),
      dtype=dtype,
      param_dtype=param_dtype,
      remat=remat,
      where=f"LLaMA in {folder}",
  )


def save_llama(model: LlamaForCausalLM, folder: str, dtype=np.float32):
  """Writes config.json + model.safetensors that transformers' `from_pretrained` opens."""
  raw = model.config.raw
  if raw is None:
    raise ValueError("this LlamaForCausalLM was built without a config dict; cannot export")
  os.makedirs(folder, exist_ok=True)
  cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **raw}
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
  write_safetensors(
      os.path.join(folder, "model.safetensors"),
      llama_state_dict(model, dtype=dtype),
      metadata={"format": "pt"},
  )
