"""Our safetensors reader and writer against the `safetensors` package's own, bit for bit.

The reader and writer in `mre/model_io/safetensors_io.py` parse the format themselves (no torch at run
time), so every float width, bf16 above all, is checked here against files the library wrote and
files it reads: same names, dtypes, shapes and bytes, including NaN payloads, infinities, signed
zeros and subnormals.
"""

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from mre.model_io import safetensors_io

# Bit patterns that a float conversion on the way would change or lose.
_SPECIAL_BF16 = np.array(
    [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0xFFA5, 0x0001, 0x807F, 0x3F80, 0x7F7F, 0xC2F7],
    np.uint16,
)
_SPECIAL_F16 = np.array(
    [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E01, 0xFD23, 0x0001, 0x83FF, 0x3C00, 0x7BFF, 0xD640],
    np.uint16,
)
_SPECIAL_F32 = np.array(
    [
        0x00000000,
        0x80000000,
        0x7F800000,
        0xFF800000,
        0x7FC00123,
        0xFFA00001,
        0x00000001,
        0x807FFFFF,
        0x3F800000,
        0x7F7FFFFF,
        0xC2F6E979,
    ],
    np.uint32,
)


def _random_bits(rs, shape, bits_dtype, special):
  """Random bit patterns of a float width, with the special ones at the start."""
  info = np.iinfo(bits_dtype)
  raw = rs.randint(0, int(info.max) + 1, size=int(np.prod(shape)), dtype=np.int64).astype(
      bits_dtype
  )
  n = min(raw.size, special.size)
  raw[:n] = special[:n]
  return raw.reshape(shape)


def _torch_tensors():
  """{name: torch tensor}: bf16, f16 and f32 of several shapes (scalar and empty included)."""
  rs = np.random.RandomState(0)
  out = {}
  for name, shape in (
      ("conv.weight", (4, 3, 3, 3)),
      ("linear.weight", (7, 5)),
      ("bias", (11,)),
      ("scalar", ()),
      ("empty", (0, 3)),
  ):
    b16 = _random_bits(rs, shape, np.uint16, _SPECIAL_BF16)
    out[f"bf16.{name}"] = torch.from_numpy(b16.view(np.int16).copy()).view(torch.bfloat16)
    f16 = _random_bits(rs, shape, np.uint16, _SPECIAL_F16)
    out[f"f16.{name}"] = torch.from_numpy(f16.view(np.int16).copy()).view(torch.float16)
    f32 = _random_bits(rs, shape, np.uint32, _SPECIAL_F32)
    out[f"f32.{name}"] = torch.from_numpy(f32.view(np.int32).copy()).view(torch.float32)
  return out


_TORCH_TO_NUMPY = {
    torch.bfloat16: ml_dtypes.bfloat16,
    torch.float16: np.float16,
    torch.float32: np.float32,
}
_BITS = {2: (torch.int16, np.uint16), 4: (torch.int32, np.uint32)}


def _torch_bits(t):
  """The raw bits of a float tensor as unsigned integers (numpy)."""
  as_int, unsigned = _BITS[t.element_size()]
  return t.contiguous().view(as_int).numpy().view(unsigned)


def _numpy_bits(a):
  return a.view(_BITS[a.dtype.itemsize][1])


def test_reads_what_the_library_writes_bit_for_bit(tmp_path):
  tensors = _torch_tensors()
  path = str(tmp_path / "lib.safetensors")
  safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
  ours = safetensors_io.read_safetensors(path)
  assert sorted(ours) == sorted(tensors)
  for name, t in tensors.items():
    a = ours[name]
    assert a.dtype == np.dtype(_TORCH_TO_NUMPY[t.dtype]), name
    assert a.shape == tuple(t.shape), name
    np.testing.assert_array_equal(_numpy_bits(a), _torch_bits(t), err_msg=name)
  # The values read are usable numbers, not views of a buffer that goes away.
  assert ours["bf16.linear.weight"].flags.writeable
  assert np.isinf(ours["bf16.conv.weight"].reshape(-1)[2])
  assert np.isnan(ours["f16.conv.weight"].reshape(-1)[4])


def test_the_library_reads_what_we_write_bit_for_bit(tmp_path):
  # Scalars included: numpy's ascontiguousarray once made them shape [1] on the way out.
  tensors = {
      name: t.numpy() if t.dtype != torch.bfloat16 else _torch_bits(t).view(ml_dtypes.bfloat16)
      for name, t in _torch_tensors().items()
  }
  path = str(tmp_path / "ours.safetensors")
  safetensors_io.write_safetensors(path, tensors, metadata={"format": "pt", "step": 3})
  back = safetensors.torch.load_file(path)
  assert sorted(back) == sorted(tensors)
  for name, a in tensors.items():
    t = back[name]
    assert _TORCH_TO_NUMPY[t.dtype] == a.dtype and tuple(t.shape) == a.shape, name
    np.testing.assert_array_equal(_torch_bits(t), _numpy_bits(a), err_msg=name)
  with safetensors.safe_open(path, framework="np") as f:
    assert f.metadata() == {"format": "pt", "step": "3"}


@pytest.mark.parametrize(
    "dtype",
    [np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_],
)
def test_other_dtypes_round_trip_with_the_numpy_api(tmp_path, dtype):
  rs = np.random.RandomState(1)
  a = (rs.rand(3, 4) > 0.5) if dtype is np.bool_ else (rs.randn(3, 4) * 50).astype(dtype)
  lib_path, our_path = str(tmp_path / "lib.safetensors"), str(tmp_path / "ours.safetensors")
  safetensors.numpy.save_file({"x": a}, lib_path)
  ours = safetensors_io.read_safetensors(lib_path)["x"]
  assert ours.dtype == a.dtype and ours.shape == a.shape
  np.testing.assert_array_equal(ours, a)
  safetensors_io.write_safetensors(our_path, {"x": a})
  lib = safetensors.numpy.load_file(our_path)["x"]
  assert lib.dtype == a.dtype and lib.shape == a.shape
  np.testing.assert_array_equal(lib, a)


def test_a_truncated_or_garbled_file_is_a_clear_error(tmp_path):
  path = str(tmp_path / "x.safetensors")
  safetensors.torch.save_file({"w": torch.ones(2, dtype=torch.bfloat16)}, path)
  data = open(path, "rb").read()
  open(path, "wb").write(data[:5])
  with pytest.raises(safetensors_io.WeightsError, match="too short"):
    safetensors_io.read_safetensors(path)
  open(path, "wb").write(data[:8] + b"{not json" + data[17:])
  with pytest.raises(safetensors_io.WeightsError, match="no valid safetensors header"):
    safetensors_io.read_safetensors(path)
