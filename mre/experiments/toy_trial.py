"""One toy editor trained and judged: the trials behind the toy recipe's choices.

  python -m mre.experiments.toy_trial --workdir=runs/trial/weight10 --steps=1500 --target=ideal \
      --set=train.edit_weight=10.0

trains the stage-1 recipe (`configs/ip2p.py:toy`) with the given overrides, edits the first
`--eval_items` test scenes with the replication's settings (DDIM 20, s_T 2, s_I 1) and prints the
toy judge's yes-rates overall and per category, with the commonest failure texts of each. With
`--target=ideal` it trains on the flawless edits of toy_edit instead of the flawed ones: what the
editor can learn in the budget, apart from what the flaws teach it. The numbers go to
`trial.json` in the workdir; a rerun resumes training and re-judges nothing.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from mre import train
from mre.data.train_input import default_data_dir
from mre.experiments import stats, toy_eval
from mre.experiments.recipes import parse_overrides, stage1_config


def run_trial(
    workdir: str,
    *,
    steps: int,
    target: str = "edited",
    seed: int = 0,
    eval_items: int = 140,
    data_dir: str = "",
    overrides=None,
    settings=None,
) -> dict:
  data_dir = data_dir or default_data_dir()
  settings = settings or toy_eval.eval_settings()
  tag = toy_eval.settings_tag(settings)
  config = stage1_config(
      workdir,
      steps=steps,
      seed=seed,
      data_dir=data_dir,
      overrides={"data.target_key": target, **(overrides or {})},
  )
  summary = train.train(config)
  if summary.get("stopped"):
    raise SystemExit(f"training stopped ({summary['stopped']}); rerun the command to resume")
  items = toy_eval.load_items(config, data_dir, eval_items)
  row = toy_eval.evaluate_row(
      os.path.join(workdir, "export"),
      items,
      os.path.join(workdir, f"eval_{tag}" if tag else "eval"),
      config.data.resolution,
      settings=settings,
  )
  result = {
      "steps": steps,
      "target": target,
      "seed": seed,
      "overrides": overrides or {},
      "eval": settings,
      "summary": row["summary"],
      "failures": stats.failures(row["records"].values()),
  }
  with open(os.path.join(workdir, f"trial_{tag}.json" if tag else "trial.json"), "w") as f:
    json.dump(result, f, indent=1)
  return result


def format_trial(result: dict) -> str:
  lines = [
      f"steps {result['steps']}, target {result['target']}, seed {result['seed']}, "
      f"overrides {result['overrides']}, edits {result['eval']}",
      "category     n  following  preserving  quality  (yes-rate)",
  ]
  for category, d in result["summary"].items():
    rates = "  ".join(f"{100 * d[p]['yes_rate']:9.1f}%" for p in stats.PERSPECTIVES)
    lines.append(f"{category:10s} {d['n']:4d} {rates}")
  for category, by_perspective in sorted(result["failures"].items()):
    for p, common in by_perspective.items():
      lines.append(f"  {category} {p}: " + "; ".join(f"{text!r} x{n}" for text, n in common))
  return "\n".join(lines)


def define_flags():
  flags.DEFINE_string("workdir", None, "Where the run, its edits and trial.json go.")
  flags.DEFINE_integer("steps", 1500, "Training steps.")
  flags.DEFINE_enum("target", "edited", ["edited", "ideal"], "Train on the flawed or ideal edits.")
  flags.DEFINE_integer("seed", 0, "Training seed.")
  flags.DEFINE_integer("eval_items", 140, "Test edits judged (the split lists 5 per scene).")
  flags.DEFINE_string("data_dir", "", "TFDS data_dir ('' = ~/tensorflow_datasets).")
  flags.DEFINE_multi_string("set", [], "Config override KEY=VALUE (repeatable).")
  toy_eval.define_eval_flags()
  flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  f = flags.FLAGS
  train.quiet_library_logs()
  train.enable_compilation_cache()
  result = run_trial(
      f.workdir,
      steps=f.steps,
      target=f.target,
      seed=f.seed,
      eval_items=f.eval_items,
      data_dir=f.data_dir,
      overrides=parse_overrides(f.set),
      settings=toy_eval.settings_from_flags(),
  )
  print(format_trial(result))


if __name__ == "__main__":
  define_flags()
  app.run(main)
