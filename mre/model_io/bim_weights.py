"""The BIM's weights in the release's layout (`modulate-*/adapter_model.bin`): read, checked and
written.

The released file holds `modulate_head.*`, `modulate_transformer.*`,
`pe_layer.positional_encoding_gaussian_matrix` (a buffer: saved, never trained) and the two
zero-initialised heads, under the names the NNX module has (`mre/models/bim.py`). `.bin` files
need torch; the same tensors as `.safetensors` need nothing. Import names every missing,
unexpected or mis-shaped tensor.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mre.model_io.safetensors_io import (
    WeightsError,
    read_safetensors,
    read_state_dict,
    write_safetensors,
)
from mre.model_io.torch_state_dict import load_state_dict, materialize_non_params, state_dict
from mre.models.bim import BIM, BIMConfig

BUFFERS = ("pe_layer.positional_encoding_gaussian_matrix",)
FILENAME = "adapter_model.safetensors"
_LAYER = re.compile(r"^modulate_transformer\.layers\.(\d+)\.")


def _buffer(model: BIM, name: str) -> nnx.Variable:
  node = model
  for part in name.split("."):
    node = getattr(node, part)
  return node


def bim_state_dict(model: BIM) -> dict[str, np.ndarray]:
  """Every tensor of the released file: PyTorch layout, float32, the release's names."""
  out = state_dict(model)
  for name in BUFFERS:
    out[name] = np.asarray(jax.device_get(_buffer(model, name).get_value()), np.float32)
  return out


def _abstract_copy(model):
  """The model with shapes only: where a failed import is checked without writing anything."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))


def load_bim_state_dict(model: BIM, tensors: dict, *, where: str = "BIM"):
  """Copies a release-layout state dict into `model` in place; nothing is written unless every
  tensor matches. Raises `WeightsError` naming each missing, unexpected or mis-shaped tensor."""
  tensors = dict(tensors)
  buffers = {name: tensors.pop(name, None) for name in BUFFERS}
  problems = []
  for name, arr in buffers.items():
    want = tuple(_buffer(model, name).shape)
    if arr is None:
      problems.append(f"missing tensors: {name}")
    elif tuple(np.shape(arr)) != want:
      problems.append(
          f"tensor {name} has shape {tuple(np.shape(arr))} in the checkpoint but "
          f"the model expects {want}"
      )
  try:
    load_state_dict(model if not problems else _abstract_copy(model), tensors, where=where)
  except WeightsError as e:
    if not problems:
      raise
    raise WeightsError("\n  ".join([str(e)] + problems)) from None
  if problems:
    raise WeightsError(
        f"{where}: checkpoint does not match the model config:\n  " + "\n  ".join(problems)
    )
  for name, arr in buffers.items():
    var = _buffer(model, name)
    old = var.get_value()
    new = jnp.asarray(np.asarray(arr, np.float32), dtype=old.dtype)
    sharding = getattr(old, "sharding", None)
    var.set_value(jax.device_put(new, sharding) if sharding is not None else new)


def config_from_tensors(tensors: dict, *, heads: int = 8, **overrides) -> BIMConfig:
  """The sizes a release-layout state dict implies; the head count is not in the shapes (the
  release's is 8). A tensor that is absent leaves its default (the import then names it)."""
  base = BIMConfig()
  shape = lambda name: tuple(np.shape(tensors[name])) if name in tensors else None  # noqa: E731
  found = {"heads": heads}
  if head := shape("modulate_head.weight"):
    found["width"], found["qformer_dim"] = head
  depths = [int(m.group(1)) + 1 for k in tensors if (m := _LAYER.match(k))]
  if depths:
    found["depth"] = max(depths)
  if lin1 := shape("modulate_transformer.layers.0.mlp.lin1.weight"):
    found["mlp_dim"] = lin1[0]
  q = shape("modulate_transformer.layers.0.cross_attn_token_to_image.q_proj.weight")
  width = found.get("width", base.width)
  if q and q[0] and width % q[0] == 0:
    found["attention_downsample_rate"] = width // q[0]
  if conv := shape("dimension_reduction_head_zeroconv.weight"):
    found["conv_in_channels"] = conv[0]
  found.update(overrides)
  return dataclasses.replace(base, **found)


def read_bim_tensors(path: str) -> dict[str, np.ndarray]:
  """A release `modulate-*` folder, or one `.bin` / `.safetensors` file in its layout."""
  if os.path.isdir(path):
    return read_state_dict(path)
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  if path.endswith(".bin"):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise WeightsError(f"{path} is a PyTorch pickle; install torch or use .safetensors") from e
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in raw.items()}
  raise WeightsError(f"{path}: expected a folder, a .bin or a .safetensors file")


def load_bim(
    path: str,
    config: BIMConfig | dict | None = None,
    *,
    heads: int = 8,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    remat=False,
) -> BIM:
  """A BIM from released (or exported) weights; its sizes come from the tensors unless given."""
  tensors = read_bim_tensors(path)
  if config is None:
    config = config_from_tensors(tensors, heads=heads)
  model = nnx.eval_shape(
      lambda: BIM(config, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0))
  )
  load_bim_state_dict(model, tensors, where=f"BIM in {path}")
  return materialize_non_params(model)


def save_bim(model: BIM, path: str) -> str:
  """Writes the release's layout to `path` (a folder gets `adapter_model.safetensors`; a `.bin`
  path is written with torch, as the release did). Returns the file written."""
  if os.path.isdir(path) or not os.path.splitext(path)[1]:
    os.makedirs(path, exist_ok=True)
    path = os.path.join(path, FILENAME)
  tensors = bim_state_dict(model)
  if path.endswith(".bin"):
    import torch  # pylint: disable=import-outside-toplevel

    torch.save({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, path)
  else:
    write_safetensors(path, tensors)
  return path
