"""The paper's claim replayed in the toy world: `python -m mre.experiments.toy_replication`.

As in the paper, the reward model is a fine-tune of an already trained InstructPix2Pix editor:

  stage 1   the InstructPix2Pix-style toy editor, trained from scratch without rewards on the flawed
            toy_edit triplets (as InstructPix2Pix was trained on its flawed generated data);
  (a)       stage 1 trained further without rewards,
  (b)       stage 1 trained further with the multi-reward condition (paper form),
            on the same annotated triplets, with the same recipe, steps and seed.

Every model edits the held-out test scenes (all five categories) and the toy judge answers the
three evaluation questions in process. The table gives, per row, the yes-rate and the mean score of
each perspective with 95% bootstrap intervals over test items, overall and per category. The claim
holds when (b) at reward (5,5,5) beats (a) on all three perspectives with non-overlapping yes-rate
intervals. Control rows evaluate (b) with one perspective's score lowered to 1 (and all three):
each should bring back its own perspective's flaws more than the others'. `--ablations` adds the
paper's ablations (scores only, texts only, latent injection only, U-Net injection only) and
reward guidance. Reruns resume: training from checkpoints, evaluation from cached edits and
judgements.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from mre import train
from mre.data.train_input import default_data_dir, open_dataset
from mre.experiments import report, toy_eval
from mre.experiments.recipes import (
    ABLATIONS,
    parse_overrides,
    smartedit_config,
    stage1_config,
    stage2_config,
)
from mre.models.reward_config import RewardConfig, parse_scores, parse_texts

CONTROL = ((1, 5, 5), (5, 1, 5), (5, 5, 1), (1, 1, 1))


def _train(cfg, timings: dict, name: str) -> str:
  """Trains (or resumes) one run and returns its exported editor."""
  t0 = time.time()
  summary = train.train(cfg)
  if summary.get("stopped"):
    raise SystemExit(f"{name} stopped ({summary['stopped']}); rerun the command to resume")
  timings[f"train {name}"] = round(time.time() - t0, 1)
  return os.path.join(cfg.workdir, "export")


def replicate(
    workdir: str,
    *,
    seed: int = 0,
    stage1_steps=None,
    stage2_steps=None,
    data_dir: str = "",
    eval_items: int = 0,
    ablations: bool = False,
    control: bool = True,
    control_texts: str = "perfect",
    negative_guidance=(),
    negative_reward=(1, 1, 1),
    negative_texts=None,
    smartedit: bool = False,
    smartedit_steps=None,
    smartedit_overrides=None,
    overrides=None,
    settings=None,
) -> dict:
  """Runs the whole replication; returns the report (also written to `workdir`).

  `overrides` ({"train.batch_per_device": 8, ...}) apply to every run (tests use tiny settings).
  `control=False` evaluates only the main rows (a second seed's check of the claim).
  `control_texts="empty"` gives the control rows' lowered perspective the empty failure text
  (the others keep "nothing wrong"); "perfect" keeps all three texts at "nothing wrong".
  `negative_guidance` (scales s_R) adds rows of (b) at 5,5,5 guided away from `negative_reward`
  (with `negative_texts`: three failure texts, None keeping the "nothing wrong" one).
  `smartedit` also trains the SmartEdit-style toy editor from stage 1's U-Net without and with
  the reward (`smartedit_steps` each, default 1,500; `smartedit_overrides` on top of
  `overrides` for these two runs only) and evaluates both at 5,5,5.
  `settings` (from `toy_eval.eval_settings`) evaluates at other edit settings: the same trained
  runs, edits and reports in `workdir/eval_<tag>/` (the default settings' are in `workdir`).
  """
  settings = settings or toy_eval.eval_settings()
  tag = toy_eval.settings_tag(settings)
  start, timings = time.time(), {}
  workdir = os.path.abspath(workdir)
  data_dir = data_dir or default_data_dir()
  common = dict(seed=seed, data_dir=data_dir, overrides=overrides or {})
  s1 = stage1_config(os.path.join(workdir, "stage1"), steps=stage1_steps, **common)
  stage1 = _train(s1, timings, "stage 1")
  runs = {
      "baseline": stage2_config(
          os.path.join(workdir, "baseline"), stage1, rewards=False, steps=stage2_steps, **common
      ),
      "reward": stage2_config(
          os.path.join(workdir, "reward"), stage1, rewards=True, steps=stage2_steps, **common
      ),
  }
  if ablations:
    for name, fields in ABLATIONS.items():
      runs[name] = stage2_config(
          os.path.join(workdir, name),
          stage1,
          rewards=True,
          steps=stage2_steps,
          extra=fields,
          **common,
      )
  if smartedit:
    for name, rewards in (("smartedit_baseline", False), ("smartedit_reward", True)):
      runs[name] = smartedit_config(
          os.path.join(workdir, name),
          stage1,
          rewards=rewards,
          steps=smartedit_steps,
          seed=seed,
          data_dir=data_dir,
          overrides={**(overrides or {}), **(smartedit_overrides or {})},
      )
  exports = {name: _train(cfg, timings, name) for name, cfg in runs.items()}
  exports["stage1"] = stage1

  t0 = time.time()
  open_dataset(s1)  # built if missing: all runs may be trained already, on an older version
  items = toy_eval.load_items(s1, data_dir, eval_items)
  rows = {}
  report_dir = os.path.join(workdir, f"eval_{tag}") if tag else workdir
  os.makedirs(report_dir, exist_ok=True)
  evaluate = lambda label, run, **kw: toy_eval.evaluate_row(  # noqa: E731
      exports[run],
      items,
      os.path.join(report_dir, "eval", label),
      s1.data.resolution,
      settings=settings,
      **kw,
  )
  rows["stage 1"] = evaluate("stage1", "stage1")
  rows["(a) baseline"] = evaluate("baseline", "baseline")
  rows["(b) reward 5,5,5"] = evaluate("reward_5-5-5", "reward", reward=(5, 5, 5))
  if control_texts not in ("perfect", "empty"):
    raise ValueError(f"control_texts must be 'perfect' or 'empty', got {control_texts!r}")
  perfect = RewardConfig(form=runs["reward"].model.reward.form).perfect_texts
  for scores in CONTROL if control else ():
    tag = ",".join(map(str, scores))
    if control_texts == "perfect":
      rows[f"(b) reward {tag}"] = evaluate(
          f"reward_{tag.replace(',', '-')}", "reward", reward=scores
      )
    else:  # a lowered score says "worse", its empty text does not say why
      texts = tuple("" if s < 5 else t for s, t in zip(scores, perfect))
      rows[report.EMPTY_TEXT_ROW.format(tag)] = evaluate(
          f"reward_{tag.replace(',', '-')}_text_empty", "reward", reward=scores, reward_texts=texts
      )
  for scale in negative_guidance:
    away = ",".join(map(str, negative_reward))
    said = [t for t in negative_texts or () if t is not None]
    rows[f"(b) reward 5,5,5, away from {away}{report.texts_label(said)} at {scale:g}"] = evaluate(
        f"reward_away_{away.replace(',', '-')}{report.texts_tag(said)}_{scale:g}",
        "reward",
        reward=(5, 5, 5),
        reward_scale=scale,
        reward_negative=tuple(negative_reward),
        reward_negative_texts=tuple(negative_texts) if negative_texts else None,
    )
  if ablations:
    for name in ABLATIONS:
      if name == "reward_dropout":
        rows["(b) reward dropout 0.1, 5,5,5"] = evaluate(name, name, reward=(5, 5, 5))
        for scale in (1.5, 3.0):
          rows[f"(b) reward dropout 0.1, reward guidance {scale:g}"] = evaluate(
              f"{name}_guidance_{scale:g}", name, reward=(5, 5, 5), reward_scale=scale
          )
      else:
        rows[f"(b) {name.replace('_', ' ')}"] = evaluate(name, name, reward=(5, 5, 5))
      if name == "scores_only":
        # Does a score control its own perspective when no failure text speaks beside it?
        for scores in CONTROL if control else ():
          tag = ",".join(map(str, scores))
          rows[f"(b) scores only, {tag}"] = evaluate(
              f"{name}_{tag.replace(',', '-')}", name, reward=scores
          )
  if smartedit:
    rows["SmartEdit (a) baseline"] = evaluate("smartedit_baseline", "smartedit_baseline")
    rows["SmartEdit (b) reward 5,5,5"] = evaluate(
        "smartedit_reward_5-5-5", "smartedit_reward", reward=(5, 5, 5)
    )
  timings["evaluate"] = round(time.time() - t0, 1)
  timings["total"] = round(time.time() - start, 1)

  result = report.build(
      rows,
      items,
      report_dir,
      timings=timings,
      settings={
          "seed": seed,
          "stage1_steps": s1.train.steps,
          "stage2_steps": runs["reward"].train.steps,
          "eval_items": len(items),
          "control": control,
          "control_texts": control_texts,
          "negative_guidance": list(negative_guidance),
          "negative_reward": list(negative_reward),
          **({"negative_texts": list(negative_texts)} if negative_texts else {}),
          **({"smartedit_steps": runs["smartedit_reward"].train.steps} if smartedit else {}),
          "overrides": overrides or {},
          "eval": settings,
          "batch": s1.train.batch_per_device,
          "resolution": s1.data.resolution,
      },
  )
  result["report_dir"] = report_dir
  with open(os.path.join(report_dir, "replication.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(report_dir, "replication.md"), "w") as f:
    f.write(result["markdown"])
  return result


def _scores(values) -> tuple:
  """--negative_reward's three scores; whole numbers stay ints, so rows read "1,1,1"."""
  try:
    scores = parse_scores(",".join(values))
  except ValueError as e:
    raise app.UsageError(f"--negative_reward: {e}") from e
  return tuple(int(v) if v.is_integer() else v for v in scores)


def _texts(values):
  """--negative_text's three texts ('*' -> None), or None when not given."""
  try:
    return parse_texts(values)
  except ValueError as e:
    raise app.UsageError(f"--negative_text: {e}") from e


def define_flags():
  """The command's flags, defined only when it runs as a command: importing `replicate` (tests,
  notebooks) must not claim flag names such as --seed that other modules' commands define too."""
  flags.DEFINE_string("workdir", "runs/toy_replication", "Where the runs and reports go.")
  flags.DEFINE_integer("seed", 0, "Training seed of every run (stage 1 and stage 2).")
  flags.DEFINE_integer("stage1_steps", None, "Stage-1 steps (default: the recipe's).")
  flags.DEFINE_integer(
      "stage2_steps", None, "Stage-2 steps of (a) and (b) (default: the recipe's)."
  )
  flags.DEFINE_string("data_dir", "", "TFDS data_dir ('' = ~/tensorflow_datasets).")
  flags.DEFINE_integer("eval_items", 0, "Test edits judged per row (0 = all 560).")
  flags.DEFINE_bool(
      "ablations",
      False,
      "Also train and evaluate the ablations and reward guidance (a longer run).",
  )
  flags.DEFINE_multi_string(
      "set", [], "Config override KEY=VALUE for every run (repeatable), e.g. train.edit_weight=0."
  )
  flags.DEFINE_bool(
      "control",
      True,
      "Evaluate (b) at the control scores (1,5,5), (5,1,5), (5,5,1), (1,1,1); --nocontrol "
      "evaluates the main rows only (a second seed's check of the claim).",
  )
  flags.DEFINE_enum(
      "control_texts",
      "perfect",
      ["perfect", "empty"],
      "Failure texts of the control rows: 'perfect' keeps all three at 'nothing wrong'; 'empty' "
      "gives the lowered perspective the empty text (for a model trained with "
      "model.reward.text_dropout_prob > 0).",
  )
  flags.DEFINE_list(
      "negative_guidance",
      [],
      "Reward guidance scales s_R at which (b) at 5,5,5 is also evaluated guided away from "
      "--negative_reward (ours, like a negative prompt; no reward dropout needed), e.g. 1,2.",
  )
  flags.DEFINE_list(
      "negative_reward", ["1", "1", "1"], "The scores --negative_guidance guides away from."
  )
  flags.DEFINE_multi_string(
      "negative_text",
      [],
      "Failure texts of --negative_reward, three times ('*' keeps 'nothing wrong'), e.g. "
      "--negative_text='*' --negative_text='*' --negative_text='the image is blurry'.",
  )
  flags.DEFINE_bool(
      "smartedit",
      False,
      "Also train the SmartEdit-style toy editor from stage 1's U-Net, without and with the "
      "reward, and evaluate both (the paper's second editor).",
  )
  flags.DEFINE_integer("smartedit_steps", None, "Steps of each SmartEdit run (default: 1,500).")
  flags.DEFINE_multi_string(
      "smartedit_set", [], "Config override KEY=VALUE for the two SmartEdit runs only."
  )
  toy_eval.define_eval_flags()


def main(argv):
  del argv
  f = flags.FLAGS
  train.quiet_library_logs()
  train.enable_compilation_cache()  # reruns and the second seed load the compiled steps
  result = replicate(
      f.workdir,
      seed=f.seed,
      stage1_steps=f.stage1_steps,
      stage2_steps=f.stage2_steps,
      data_dir=f.data_dir,
      eval_items=f.eval_items,
      ablations=f.ablations,
      control=f.control,
      control_texts=f.control_texts,
      negative_guidance=[float(v) for v in f.negative_guidance],
      negative_reward=_scores(f.negative_reward),
      negative_texts=_texts(f.negative_text),
      smartedit=f.smartedit,
      smartedit_steps=f.smartedit_steps,
      smartedit_overrides=parse_overrides(f.smartedit_set),
      overrides=parse_overrides(f.set),
      settings=toy_eval.settings_from_flags(),
  )
  print(result["markdown"])
  print(
      f"reports: {os.path.join(result['report_dir'], 'replication.md')} and "
      "replication.json; grids: grid.png, control_grid.png"
  )


if __name__ == "__main__":
  define_flags()
  app.run(main)
