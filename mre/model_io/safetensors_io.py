"""Safetensors files read and written without torch, and the weights of a model folder.

`read_safetensors` / `write_safetensors` handle one `.safetensors` file (every float width, bf16
included, checked bit for bit against the `safetensors` package); `read_state_dict` gathers all
tensors of a diffusers/transformers model folder (sharded or not; `.bin` only with torch installed).
"""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Optional

import ml_dtypes
import numpy as np


class WeightsError(ValueError):
  """A checkpoint does not match the module it is loaded into (names the tensors), or a weights
  file cannot be read."""


_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads every tensor of a .safetensors file (any float width, bf16 included) as numpy."""
  with open(path, "rb") as f:
    data = f.read()
  if len(data) < 8:
    raise WeightsError(f"{path} is too short to be a safetensors file")
  (n,) = struct.unpack("<Q", data[:8])
  try:
    header = json.loads(data[8 : 8 + n])
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WeightsError(f"{path} has no valid safetensors header: {e}") from e
  base, out = 8 + n, {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _ST_DTYPES:
      raise WeightsError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    arr = np.frombuffer(data[base + start : base + end], dtype=_ST_DTYPES[info["dtype"]])
    out[name] = arr.reshape(info["shape"]).copy()
  return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata=None):
  """Writes tensors (numpy, C order) as one .safetensors file, names sorted like the library."""
  header, chunks, offset = {}, [], 0
  for name in sorted(tensors):
    arr = np.asarray(tensors[name])  # not ascontiguousarray: it turns a scalar into shape [1]
    raw = arr.tobytes()
    header[name] = {
        "dtype": _ST_NAMES[arr.dtype],
        "shape": list(arr.shape),
        "data_offsets": [offset, offset + len(raw)],
    }
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
      raise WeightsError(
          f"{folder} holds only .bin weights; install torch to read them, or "
          "convert them to .safetensors"
      ) from e
    state = {}
    for f in bins:
      for k, v in torch.load(f, map_location="cpu", weights_only=True).items():
        state[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
    return state
  raise WeightsError(f"no *.safetensors or *.bin weights in {folder}")
