"""Levers on the toy U-Net's training step on a CPU, each timed in turns with the others and with
PyTorch's step, in one process (load changes on a shared machine then hit all alike):

  python -m mre.bench.levers                       # every lever
  python -m mre.bench.levers --levers=baseline,bf16 --rounds=20

A lever is a variant of `jax_side.unet_train` (XLA compiler options for the one computation: which
ops go to the YNNPACK library, oneDNN, vector width, fast math; no
buffer donation, the state as a flat list of arrays, bfloat16 compute, a larger batch, the 3 x 3
kernel gradient as one matmul over the flattened grid, `mre.bench.conv_grad`'s `flat_shift`). Times are
per 32 images, so a batch lever compares with the others.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile

from absl import app, flags

from mre.bench import conv_grad, jax_side, presets, torch_side
from mre.bench.inputs import Inputs
from mre.bench.timing import time_interleaved

YNN = "LIBRARY_FUSION_TYPE_"
YNN_DOTS_ONLY = YNN + "INDIVIDUAL_DOT"
YNN_CONVS_AND_DOTS = f"{YNN}INDIVIDUAL_DOT,{YNN}INDIVIDUAL_CONVOLUTION"
# This jaxlib's XLA:CPU has no oneDNN: `xla_cpu_use_onednn` compiles the same program (the lever
# shows it), so oneDNN's weight-gradient kernels, PyTorch's edge, are out of reach.
ONEDNN = {"xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_custom_call": True}
LEVERS = {
    "baseline": {},
    "xla_fast_math": {"compiler_options": {"xla_cpu_enable_fast_math": True}},
    "xla_512bit_vectors": {"compiler_options": {"xla_cpu_prefer_vector_width": 512}},
    "xla_eigen_convs": {
        "compiler_options": {"xla_cpu_experimental_ynn_fusion_type": YNN_DOTS_ONLY}
    },
    "ynn_convs_and_dots": {
        "compiler_options": {"xla_cpu_experimental_ynn_fusion_type": YNN_CONVS_AND_DOTS}
    },
    "ynn_plus_elementwise": {
        "compiler_options": {
            "xla_cpu_experimental_ynn_fusion_type": f"{YNN_CONVS_AND_DOTS},{YNN}ELTWISE"
        }
    },
    "onednn": {"compiler_options": ONEDNN},
    "flat_kernel_grad": {"conv_fn": conv_grad.flat_shift_conv_general_dilated},
    "no_donation": {"donate": False},
    "flat_state": {"flat_state": True},
    "bf16": {"dtype": "bfloat16"},
    "batch64": {"batch": 64},
    "torch": {"torch": True},
    "torch_bf16": {"torch": True, "dtype": "bfloat16"},
}
PER = 32  # images: times are reported per this many


def runner(name: str, preset: presets.Preset, inputs: Inputs):
  lever = dict(LEVERS[name])
  changes = {k: lever.pop(k) for k in ("dtype", "batch") if k in lever}
  p = dataclasses.replace(preset, **changes)
  if lever.pop("torch", False):
    return torch_side.unet_train(p, inputs, "cpu")
  return jax_side.unet_train(p, inputs, **lever)


def run(preset: presets.Preset, names, *, rounds: int, warmup: int = 2, log=print) -> list:
  """[{lever, ms_per_32, vs_baseline, compile_s}] with every lever timed in turns."""
  inputs = Inputs(preset)
  runners = {}
  for name in names:
    log(f"preparing {name}")
    runners[name] = runner(name, preset, inputs)
  timings = time_interleaved({k: r.call for k, r in runners.items()}, warmup=warmup, reps=rounds)
  per = {k: t.median / runners[k].items * PER * 1e3 for k, t in timings.items()}
  base = per.get("baseline")
  return [
      {
          "lever": k,
          "ms_per_32": per[k],
          "min_ms_per_32": min(timings[k].times) / runners[k].items * PER * 1e3,
          "vs_baseline": per[k] / base if base else None,
          "compile_s": runners[k].info.get("compile_s"),
      }
      for k in names
  ]


def table(rows) -> str:
  lines = [f"{'lever':22s} {'ms/32 img':>10s} {'min':>8s} {'vs baseline':>12s}"]
  for r in rows:
    vs = f"{r['vs_baseline']:.2f}" if r["vs_baseline"] else "-"
    lines.append(f"{r['lever']:22s} {r['ms_per_32']:10.1f} {r['min_ms_per_32']:8.1f} {vs:>12s}")
  return "\n".join(lines)


_LEVERS = flags.DEFINE_list("levers", list(LEVERS), f"Levers to time, of {list(LEVERS)}.")
_ROUNDS = flags.DEFINE_integer("rounds", 10, "Timed rounds (every lever once per round).")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", None, "torch's intra-op threads.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  bad = set(_LEVERS.value) - set(LEVERS)
  if bad:
    raise app.UsageError(f"unknown levers {sorted(bad)}; choose from {list(LEVERS)}")
  names = [n for n in _LEVERS.value if not n.startswith("torch") or not torch_side.unavailable()]
  with tempfile.TemporaryDirectory() as tmp, torch_side.threads(_TORCH_THREADS.value):
    preset = presets.with_tokenizer(presets.preset("toy", tmp + "/toy"), tmp + "/tok")
    rows = run(preset, names, rounds=_ROUNDS.value)
  print(f"\ntoy U-Net train step (batch 32, 24 px), median of {_ROUNDS.value} rounds in turns")
  print(table(rows))
  by = {r["lever"]: r["ms_per_32"] for r in rows}
  if "baseline" in by and "torch" in by:
    print(f"JAX/PyTorch (baseline/torch): {by['baseline'] / by['torch']:.2f}")


if __name__ == "__main__":
  app.run(main)
