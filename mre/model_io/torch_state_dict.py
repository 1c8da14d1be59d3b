"""PyTorch state dicts <-> NNX parameters: names and layouts.

Our modules name their attributes after the PyTorch ones, so a parameter's NNX path joined with dots
is its state-dict name once the leaf is renamed (`kernel`/`scale`/`embedding` -> `weight`). Layouts:
conv kernels are OIHW in PyTorch and HWIO here; linear weights are (out, in) there and (in, out) here.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mre.model_io.safetensors_io import WeightsError

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def torch_name(path: tuple) -> str:
  *head, leaf = path
  return ".".join([str(p) for p in head] + [_LEAF_TO_TORCH.get(leaf, leaf)])


def to_torch_layout(arr: np.ndarray) -> np.ndarray:
  if arr.ndim == 4:  # HWIO -> OIHW
    return arr.transpose(3, 2, 0, 1)
  if arr.ndim == 2:  # (in, out) -> (out, in)
    return arr.T
  return arr


def torch_layout_shape(shape: tuple) -> tuple:
  """The PyTorch shape of a kernel of NNX shape `shape` (what `to_torch_layout` produces)."""
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape[::-1] if len(shape) == 2 else shape


def from_torch_layout(arr: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and arr.ndim == 4:
    return arr.transpose(2, 3, 1, 0)
  if leaf == "kernel" and arr.ndim == 2:
    return arr.T
  return arr


def param_paths(module: nnx.Module):
  """(NNX path, torch name, Param variable) for every parameter of `module`."""
  out = []
  for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    out.append((path, torch_name(path), var))
  return out


def state_dict(module: nnx.Module, *, prefix: str = "", dtype=np.float32) -> dict[str, np.ndarray]:
  """The module's parameters as a PyTorch-layout state dict of numpy arrays."""
  out = {}
  for path, name, var in param_paths(module):
    arr = np.asarray(jax.device_get(var.get_value()), dtype=dtype)
    out[prefix + name] = np.ascontiguousarray(to_torch_layout(arr) if path[-1] == "kernel" else arr)
  return out


def load_state_dict(
    module: nnx.Module,
    tensors: dict[str, np.ndarray],
    *,
    where: str,
    prefix: str = "",
    ignore: Iterable[str] = (),
    rename: Optional[Callable[[str], str]] = None,
):
  """Copies a PyTorch state dict into `module` in place, checking names and shapes exhaustively.

  `ignore` lists state-dict names (or suffixes) that carry no parameter here (buffers such as
  CLIP's `position_ids`). Raises `WeightsError` listing every missing, unexpected or mis-shaped
  tensor with both shapes.
  """
  ignore = tuple(ignore)
  given = {}
  for k, v in tensors.items():
    if prefix and not k.startswith(prefix):
      continue
    k = k[len(prefix) :]
    k = rename(k) if rename else k
    if not (ignore and k.endswith(ignore)):
      given[k] = v
  params = param_paths(module)
  expected = {name for _, name, _ in params}
  missing = sorted(expected - set(given))
  unexpected = sorted(set(given) - expected)
  problems = []
  if missing:
    problems.append(f"missing tensors: {_clip(missing)}")
  if unexpected:
    problems.append(f"unexpected tensors: {_clip(unexpected)}")
  updates = []
  for path, name, var in params:
    if name not in given:
      continue
    arr = np.asarray(given[name])
    want = torch_layout_shape(tuple(var.shape)) if path[-1] == "kernel" else tuple(var.shape)
    if tuple(arr.shape) != want:
      problems.append(
          f"tensor {prefix}{name} has shape {tuple(arr.shape)} in the checkpoint but "
          f"the model expects {want}"
      )
      continue
    updates.append((var, from_torch_layout(arr, path[-1])))
  if problems:
    raise WeightsError(
        f"{where}: checkpoint does not match the model config:\n  " + "\n  ".join(problems)
    )
  for var, arr in updates:
    old = var.get_value()  # a real array, or a ShapeDtypeStruct when built under nnx.eval_shape
    new = jnp.asarray(arr.astype(np.float32), dtype=old.dtype)
    sharding = getattr(old, "sharding", None)
    var.set_value(jax.device_put(new, sharding) if sharding is not None else new)


def materialize_non_params(module: nnx.Module, seed: int = 0):
  """Gives concrete values to the non-parameter state (RNG keys and counters) of a module built
  under `nnx.eval_shape`, whose parameters came from a checkpoint. Keys are distinct per path."""
  for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(module, nnx.Not(nnx.Param)))):
    value = var.get_value()
    if not isinstance(value, jax.ShapeDtypeStruct):
      continue
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
      var.set_value(jax.random.fold_in(jax.random.key(seed), i))
    else:
      var.set_value(jnp.zeros(value.shape, value.dtype))
  return module


def _clip(names, n=12):
  return ", ".join(names[:n]) + (f" ... ({len(names) - n} more)" if len(names) > n else "")
