"""One preset's benchmark: each row's JAX and PyTorch calls prepared, then timed in turns.

Timing the two sides alternately, one call each, keeps their ratio meaningful on a machine whose
load changes during the run (other jobs on a shared CPU).
"""

from __future__ import annotations

import dataclasses
import gc

import jax

from mre.bench import hardware, jax_side, report, torch_edit, torch_side
from mre.bench.inputs import Inputs
from mre.bench.presets import Preset
from mre.bench.timing import time_interleaved


@dataclasses.dataclass(frozen=True)
class Settings:
  reps: int = 10  # timed repetitions per row (the median is reported)
  warmup: int = 3  # untimed calls first (the first one compiles)
  edit_reps: int = 3
  torch: str = "auto"  # "auto": the PyTorch column where torch/diffusers import; "off"
  cpu_peak_tflops: float | None = None  # a stated CPU peak instead of cores x clock x width
  measure_matmul: bool = True  # also measure the float32 matmul rate (an attainable peak)
  torch_threads: int | None = None  # torch's intra-op threads (None: its default, one per core)


def _jax_runner(name, preset, inputs, nets):
  if name == "input_pipeline":
    return jax_side.input_pipeline(preset)
  if name == "unet_train":
    return jax_side.unet_train(preset, inputs)
  if name == "trainer":
    return jax_side.trainer(preset, inputs)
  if name == "unet_forward":
    return jax_side.unet_forward(nets(), inputs)
  if name in jax_side.CONV_PARTS:
    return jax_side.conv(preset, inputs, name)
  return jax_side.edit(nets(), preset, inputs, row_batch(name, preset))


def _torch_runner(name, preset, inputs, dev, nets):
  if name == "input_pipeline":
    return "the same for both (numpy)"
  if name == "unet_train":
    return torch_side.unet_train(preset, inputs, dev)
  if name == "trainer":
    return torch_side.trainer(preset, inputs, dev)
  if name == "unet_forward":
    return torch_edit.unet_forward(nets(), inputs)
  if name in jax_side.CONV_PARTS:
    return torch_side.conv(preset, inputs, dev, name)
  return torch_edit.edit(nets(), preset, inputs, row_batch(name, preset))


def _once(make):
  """A lazily built value, shared by the rows that need it (the editor's networks)."""
  box = []

  def get():
    if not box:
      box.append(make())
    return box[0]

  return get


def row_batch(name: str, preset: Preset) -> int:
  return {"edit": 1, "edit_batch": preset.edit_batch, "unet_forward": 1}.get(name, preset.batch)


def run(preset: Preset, settings: Settings = Settings(), log=print) -> dict:
  """Times every row of `preset` in JAX and in PyTorch; returns the result (see `report`)."""
  with torch_side.threads(settings.torch_threads if settings.torch != "off" else None):
    return _run(preset, settings, log)


def _run(preset: Preset, settings: Settings, log) -> dict:
  info = hardware.device_info()
  peak, source = hardware.peak_tflops(preset.dtype, settings.cpu_peak_tflops)
  result = {
      "preset": {
          "name": preset.name,
          "resolution": preset.resolution,
          "batch": preset.batch,
          "edit_batch": preset.edit_batch,
          "edit_steps": preset.edit_steps,
          "dtype": preset.dtype,
          "remat": list(preset.remat),
          "unet": preset.unet,
          "text_encoder": preset.text,
          "vae": preset.vae,
      },
      "device": info,
      "versions": {"jax": jax.__version__},
      "peak_tflops": peak,
      "peak_source": source,
      "reps": settings.reps,
      "warmup": settings.warmup,
      "edit_reps": settings.edit_reps,
      "rows": [],
  }
  if info["platform"] == "cpu" and settings.measure_matmul:
    result["matmul_tflops"] = hardware.measured_matmul_tflops()
    if not settings.cpu_peak_tflops and result["matmul_tflops"] > (peak or 0):
      # The clock in /proc/cpuinfo is the nominal one; a turbo clock beats the stated peak.
      peak = result["peak_tflops"] = result["matmul_tflops"]
      result["peak_source"] = "measured float32 matmul (above cores x nominal clock x width)"
  why_not = "off (--torch=off)" if settings.torch == "off" else torch_side.unavailable()
  dev = None
  if why_not:
    result["torch_unavailable"] = why_not
  else:
    dev = torch_side.device(info["platform"])
    result["torch_info"] = torch_side.info(dev)
  inputs = Inputs(preset)
  jax_nets = _once(lambda: jax_side.edit_pipeline(preset))
  torch_nets = _once(lambda: torch_edit.EditNetworks(preset, dev))
  for name in preset.rows:
    log(f"[{preset.name}] {name}: preparing")
    jax_runner = _jax_runner(name, preset, inputs, jax_nets)
    if isinstance(jax_runner, str):  # a row that cannot run here
      result["rows"].append(report.skipped_row(name, row_batch(name, preset), jax_runner))
      log(f"[{preset.name}] {name}: skipped ({jax_runner})")
      continue
    runners = {"jax": jax_runner}
    torch_r = {"skipped": why_not} if dev is None else None
    if dev is not None:
      runner = _torch_runner(name, preset, inputs, dev, torch_nets)
      if isinstance(runner, str):
        torch_r = {"skipped": runner}
      else:
        runners["torch"] = runner
    edits = name in ("edit", "edit_batch")
    timings = time_interleaved(
        {k: r.call for k, r in runners.items()},
        warmup=2 if edits else settings.warmup,
        reps=settings.edit_reps if edits else settings.reps,
    )
    results = {k: runners[k].result(timings[k]) for k in runners}
    row = report.make_row(
        name, row_batch(name, preset), results["jax"], results.get("torch", torch_r), peak
    )
    result["rows"].append(row)
    del runners, timings
    gc.collect()
    torch_side.release(dev)  # cached GPU memory back for the next row's JAX side
    log(
        f"[{preset.name}] {name}: JAX {row['jax']['ms']:.1f} ms"
        + (
            f", PyTorch {row['torch']['ms']:.1f} ms, ratio {row['ratio']:.2f}"
            if "ratio" in row
            else ""
        )
    )
  return result
