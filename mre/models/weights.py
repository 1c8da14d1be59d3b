"""PyTorch state dicts <-> NNX parameters, and safetensors reading/writing without torch.

Our modules name their attributes after the PyTorch ones, so a parameter's NNX path joined with dots
is its state-dict name once the leaf is renamed (`kernel`/`scale`/`embedding` -> `weight`). Layouts:
conv kernels are OIHW in PyTorch and HWIO here; linear weights are (out, in) there and (in, out) here.
"""
from __future__ import annotations

import glob
import json
import os
import struct
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx


class WeightsError(ValueError):
  """A checkpoint does not match the module it is loaded into (names the tensors)."""


_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


# --- safetensors ---------------------------------------------------------------------------------

def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads every tensor of a .safetensors file (any float width, bf16 included) as numpy."""
  with open(path, "rb") as f:
    data = f.read()
  if len(data) < 8:
    raise WeightsError(f"{path} is too short to be a safetensors file")
  (n,) = struct.unpack("<Q", data[:8])
  try:
    header = json.loads(data[8:8 + n])
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WeightsError(f"{path} has no valid safetensors header: {e}") from e
  base, out = 8 + n, {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _ST_DTYPES:
      raise WeightsError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    arr = np.frombuffer(data[base + start:base + end], dtype=_ST_DTYPES[info["dtype"]])
    out[name] = arr.reshape(info["shape"]).copy()
  return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata=None):
  """Writes tensors (numpy, C order) as one .safetensors file, names sorted like the library."""
  header, chunks, offset = {}, [], 0
  for name in sorted(tensors):
    arr = np.asarray(tensors[name])  # not ascontiguousarray: it turns a scalar into shape [1]
    raw = arr.tobytes()
    header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the format aligns tensor data to 8 bytes
  with open(path + ".tmp", "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for c in chunks:
      f.write(c)
  os.replace(path + ".tmp", path)


def read_state_dict(folder: str, stem: Optional[str] = None) -> dict[str, np.ndarray]:
  """All tensors of a diffusers/transformers model folder (.safetensors, sharded or not; else .bin).

  `.bin` (pickled PyTorch) files are read only when torch is installed; nothing downloads.
  """
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"model folder {folder} does not exist")
  index = sorted(glob.glob(os.path.join(folder, "*.safetensors.index.json")))
  files = []
  if index:
    with open(index[0]) as f:
      files = sorted({os.path.join(folder, v) for v in json.load(f)["weight_map"].values()})
  else:
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    # Prefer the plain file over variants such as `*.fp16.safetensors`.
    plain = [f for f in files if os.path.basename(f).count(".") == 1]
    files = plain[:1] or files[:1]
  if files:
    state = {}
    for f in files:
      state.update(read_safetensors(f))
    return state
  bins = sorted(glob.glob(os.path.join(folder, "*.bin")))
  if bins:
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise WeightsError(f"{folder} holds only .bin weights; install torch to read them, or "
                         "convert them to .safetensors") from e
    state = {}
    for f in bins:
      for k, v in torch.load(f, map_location="cpu", weights_only=True).items():
        state[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    return state
  raise WeightsError(f"no *.safetensors or *.bin weights in {folder}")


# --- NNX <-> torch names and layouts -------------------------------------------------------------

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


def load_state_dict(module: nnx.Module, tensors: dict[str, np.ndarray], *, where: str,
                    prefix: str = "", ignore: Iterable[str] = (),
                    rename: Optional[Callable[[str], str]] = None):
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
    k = k[len(prefix):]
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
      problems.append(f"tensor {prefix}{name} has shape {tuple(arr.shape)} in the checkpoint but "
                      f"the model expects {want}")
      continue
    updates.append((var, from_torch_layout(arr, path[-1])))
  if problems:
    raise WeightsError(f"{where}: checkpoint does not match the model config:\n  " +
                       "\n  ".join(problems))
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
