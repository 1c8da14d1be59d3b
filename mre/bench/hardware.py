"""The device under test: its name, its peak FLOP/s (for MFU) and the memory it reports.

Peaks are dense per-chip figures from the vendors' data sheets, in TFLOP/s, for bfloat16 and for
float32 as JAX computes it by default there (TF32 tensor cores on NVIDIA Ampere and later, bf16
passes on TPU). A CPU's peak is stated from its vector width: cores x clock x FLOP per cycle
(two 512-bit FMA units: 64 float32 FLOP per cycle; AVX2 + FMA: 32), and measured with a matmul.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

# device_kind substring -> (bfloat16, float32) peak TFLOP/s; the first match wins (longest first).
PEAK_TFLOPS = (
    ("H200", 989.4, 494.7),
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.4, 494.7),  # SXM
    ("GH200", 989.4, 494.7),
    ("A100", 312.0, 156.0),
    ("L40S", 362.1, 183.0),
    ("L4", 121.0, 60.0),
    ("A10", 125.0, 62.5),
    ("V100", 125.0, 15.7),
    ("TPU v6 lite", 918.0, 918.0),  # v6e (Trillium)
    ("TPU v5 lite", 197.0, 197.0),  # v5e
    ("TPU v5p", 459.0, 459.0),
    ("TPU v5", 459.0, 459.0),
    ("TPU v4", 275.0, 275.0),
    ("TPU v3", 123.0, 123.0),
)


def usable_cores() -> int:
  """The cores this process may run on (its affinity: `taskset` narrows it)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def device_info() -> dict:
  d = jax.devices()[0]
  info = {"platform": d.platform, "kind": d.device_kind, "devices_used": 1}
  if d.platform == "cpu":
    info["cores"] = usable_cores()
    info["cpu"] = _cpu_model()
  return info


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown"


def _cpu_flags_and_mhz():
  flags, mhz = set(), None
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags") and not flags:
          flags = set(line.split(":", 1)[1].split())
        elif line.startswith("cpu MHz") and mhz is None:
          mhz = float(line.split(":", 1)[1])
  except OSError:
    pass
  return flags, mhz


def stated_cpu_peak_tflops(dtype: str = "float32") -> float | None:
  """cores x clock x FLOP/cycle of the vector units (float32; bf16 counted the same: AMX and
  AVX512-BF16 are not what XLA:CPU's convolutions use)."""
  del dtype
  flags, mhz = _cpu_flags_and_mhz()
  if not mhz:
    return None
  per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 16
  return usable_cores() * mhz * 1e6 * per_cycle / 1e12


def measured_matmul_tflops(n: int = 1024, reps: int = 5) -> float:
  """The float32 matmul rate XLA reaches on this device (an attainable peak)."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / min(times) / 1e12


def peak_tflops(dtype: str, cpu_peak: float | None = None) -> tuple[float | None, str]:
  """(peak TFLOP/s for `dtype` on device 0, where the figure comes from)."""
  d = jax.devices()[0]
  if d.platform == "cpu":
    if cpu_peak:
      return cpu_peak, "stated (--cpu_peak_tflops)"
    stated = stated_cpu_peak_tflops(dtype)
    return stated, "stated: cores x clock x vector FLOP/cycle" if stated else "unknown"
  for name, bf16, fp32 in PEAK_TFLOPS:
    if name in d.device_kind:
      return (bf16 if dtype in ("bfloat16", "float16") else fp32), f"data sheet ({name})"
  return None, f"no peak known for {d.device_kind!r}"


def device_peak_memory_gb() -> float | None:
  """The device's peak memory in use so far (GPU/TPU); None where the backend reports none."""
  stats = jax.devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**30


def compiled_memory_gb(compiled) -> float | None:
  """XLA's memory analysis of a compiled computation: arguments + outputs + temps - aliased."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  total = (
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      + m.temp_size_in_bytes
      - m.alias_size_in_bytes
  )
  return total / 2**30
