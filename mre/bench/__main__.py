"""`python -m mre.bench`: time presets or a training config: table, JSON, Markdown."""

import os

# JAX must not take the whole accelerator: the PyTorch rows run in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import tempfile  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from mre.bench import presets, report, suite  # noqa: E402

# --config is mre.train's flag (imported with the train step): the same recipe, the same syntax,
# e.g. --config=configs/reward.py:toy --config.train.batch_per_device=16.

_PRESET = flags.DEFINE_list("preset", ["toy"], f"Presets to run, of {presets.PRESETS}.")
_ROWS = flags.DEFINE_list("rows", None, f"Rows to time (default: the preset's), of {presets.ROWS}.")
_BATCH = flags.DEFINE_integer("batch", None, "Training batch (default: the preset's).")
_EDIT_BATCH = flags.DEFINE_integer("edit_batch", None, "Batch of the batch-edit row.")
_EDIT_STEPS = flags.DEFINE_integer("edit_steps", None, "Sampling steps of the edit rows.")
_REPS = flags.DEFINE_integer("reps", 10, "Timed repetitions per row (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls before timing (the first compiles).")
_EDIT_REPS = flags.DEFINE_integer("edit_reps", 3, "Timed repetitions of the edit rows.")
_TORCH = flags.DEFINE_enum("torch", "auto", ["auto", "off"], "The PyTorch column.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", None, "torch's intra-op threads.")
_CPU_PEAK = flags.DEFINE_float("cpu_peak_tflops", None, "A stated CPU peak for MFU.")
_CACHE = flags.DEFINE_string("compilation_cache", "", "JAX persistent compilation cache folder.")
_OUT = flags.DEFINE_string("out", "", "Folder for bench.json and bench.md.")


def _override(p):
  changes = {
      k: v
      for k, v in dict(
          batch=_BATCH.value,
          edit_batch=_EDIT_BATCH.value,
          edit_steps=_EDIT_STEPS.value,
          rows=tuple(_ROWS.value) if _ROWS.value else None,
      ).items()
      if v is not None
  }
  bad = set(changes.get("rows", ())) - set(presets.ROWS)
  if bad:
    raise app.UsageError(f"unknown rows {sorted(bad)}; choose from {presets.ROWS}")
  return presets.override(p, **changes)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _CACHE.value:
    jax.config.update("jax_compilation_cache_dir", _CACHE.value)
  settings = suite.Settings(
      reps=_REPS.value,
      warmup=_WARMUP.value,
      edit_reps=_EDIT_REPS.value,
      torch=_TORCH.value,
      cpu_peak_tflops=_CPU_PEAK.value,
      torch_threads=_TORCH_THREADS.value,
  )
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    if flags.FLAGS.config is not None:
      chosen = [presets.from_config(flags.FLAGS.config, os.path.join(tmp, "config"))]
    else:
      chosen = [presets.preset(name, os.path.join(tmp, name)) for name in _PRESET.value]
    for p in chosen:
      p = presets.with_tokenizer(_override(p), os.path.join(tmp, p.name + "_tokenizer"))
      result = suite.run(p, settings)
      results.append(result)
      print("\n" + report.text_table(result) + "\n", flush=True)
  if _OUT.value:
    paths = report.write(results, _OUT.value)
    print("wrote " + " and ".join(paths))


if __name__ == "__main__":
  app.run(main)
