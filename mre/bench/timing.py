"""Timing: the median of repeated, blocking calls after warm-up, with the first call timed apart."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Optional


@dataclasses.dataclass
class Timing:
  """Seconds per call: `first` (the first call: compilation for JAX), then `times` of the timed
  repetitions that followed `warmup` untimed ones."""

  first: float
  times: list

  @property
  def median(self) -> float:
    return statistics.median(self.times)

  @property
  def best(self) -> float:
    return min(self.times)

  def summary(self) -> dict:
    return {
        "median_s": self.median,
        "min_s": self.best,
        "max_s": max(self.times),
        "reps": len(self.times),
        "first_call_s": self.first,
    }


def time_calls(call: Callable[[], object], *, warmup: int, reps: int) -> Timing:
  """`call()` must block until its result is ready (JAX: `block_until_ready`; CUDA: synchronize)."""
  t = time.perf_counter()
  call()
  first = time.perf_counter() - t
  for _ in range(max(warmup - 1, 0)):
    call()
  times = []
  for _ in range(max(reps, 1)):
    t = time.perf_counter()
    call()
    times.append(time.perf_counter() - t)
  return Timing(first, times)


def time_interleaved(calls: dict, *, warmup: int, reps: int) -> dict:
  """Like `time_calls` for several calls, timed in turns (a, b, a, b, ...): on a machine shared with
  other work, a change of load then hits every call alike, and their ratio stays meaningful."""
  firsts = {}
  for name, call in calls.items():
    t = time.perf_counter()
    call()
    firsts[name] = time.perf_counter() - t
  for _ in range(max(warmup - 1, 0)):
    for call in calls.values():
      call()
  times = {name: [] for name in calls}
  for _ in range(max(reps, 1)):
    for name, call in calls.items():
      t = time.perf_counter()
      call()
      times[name].append(time.perf_counter() - t)
  return {name: Timing(firsts[name], times[name]) for name in calls}


@dataclasses.dataclass
class Runner:
  """A prepared row: `call()` runs one step (blocking); `items` images per call.

  info: figures known before timing (compile_s, flops, memory_gb, ...); `after()`, when given, adds
  figures read after timing (peak memory). `compiles_on_first_call`: the first call's time less the
  median is the compile time (JAX editing, which compiles lazily).
  """

  call: Callable[[], object]
  items: int
  info: dict = dataclasses.field(default_factory=dict)
  after: Optional[Callable[[], dict]] = None
  compiles_on_first_call: bool = False

  def result(self, timing: Timing) -> dict:
    out = {**timing.summary(), "ms": timing.median * 1e3, "items_per_s": self.items / timing.median}
    if self.compiles_on_first_call:
      out["compile_s"] = max(timing.first - timing.median, 0.0)
    out.update(self.info)
    flops = out.get("flops")
    if flops:
      out["tflops"] = flops / timing.median / 1e12
    if "steps" in out:
      out["step_ms"] = out["ms"] / out["steps"]
    if self.after is not None:
      out.update(self.after())
    return out
