"""Evaluate an editor on a benchmark with a judge: `python -m mre.eval --model DIR --benchmark ...`.

  # Real-Edit with GPT-4o (OPENAI_API_KEY in the environment), the paper's settings
  python -m mre.eval --model=runs/reward/export --benchmark=real_edit --data_dir=/data/tfds \\
      --output=eval/real_edit
  # the toy test split with the toy judge (started in-process), and a reward sweep
  python -m mre.eval --model=runs/reward_toy/export --benchmark=toy_edit/24px --toy_judge \\
      --rewards="5,5,5;3,3,3;1,1,1;1,5,5;5,1,5;5,5,1" --output=eval/toy
  # a SmartEdit editor folder (the release's files + smartedit.json, mre.model_io.smartedit_folder)
  python -m mre.eval --model=/models/SmartEdit-7B --benchmark=real_edit --output=eval/smartedit

Outputs per setting: images/ (cached edits), results.jsonl (per item; resumable), summary.md,
summary.csv, summary.json and gallery.html; a sweep adds sweep.md comparing the settings.
`run(argv)` is the command in-process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Sequence

from absl import app, flags

from mre import cli_flags, evaluation
from mre.data import registry
from mre.editor import EditSettings
from mre.judging.client import Endpoint, JudgeClient, JudgeError, RetryPolicy
from mre.model_io.folders import load_for_editing
from mre.models.reward_config import parse_scores
from mre.smartedit_editor import SmartEditPipeline, editor_for


@dataclasses.dataclass(frozen=True)
class EvalFlags:
  model: flags.FlagHolder
  benchmark: flags.FlagHolder
  data_dir: flags.FlagHolder
  split: flags.FlagHolder
  limit: flags.FlagHolder
  output: flags.FlagHolder
  sampling: cli_flags.SamplingFlags
  smartedit: cli_flags.SmartEditFlags
  resolution: flags.FlagHolder
  rewards: flags.FlagHolder
  judge_model: flags.FlagHolder
  judge: cli_flags.JudgeFlags
  toy_judge: flags.FlagHolder
  concurrency: flags.FlagHolder
  retry_failed: flags.FlagHolder


def define_flags(flag_values=flags.FLAGS) -> EvalFlags:
  """The command's flags, defined in `flag_values` (those of the process when run as a command;
  a fresh `FlagValues` in `run`, so that mre.edit and mre.eval can share one process)."""
  fv = flag_values
  sampling = cli_flags.define_sampling_flags(batch_size=16, flag_values=fv)
  smartedit = cli_flags.define_smartedit_flags(flag_values=fv)
  judge = cli_flags.define_judge_flags(flag_values=fv)
  flags.adopt_module_key_flags(cli_flags, flag_values=fv)  # listed by --help with the command's own
  return EvalFlags(
      model=flags.DEFINE_string(
          "model",
          None,
          "mre checkpoint, diffusers pipeline folder, or SmartEdit editor folder.",
          flag_values=fv,
      ),
      benchmark=flags.DEFINE_string(
          "benchmark",
          "real_edit",
          "TFDS benchmark: real_edit, toy_edit/24px, ...",
          flag_values=fv,
      ),
      data_dir=flags.DEFINE_string(
          "data_dir",
          os.path.expanduser("~/tensorflow_datasets"),
          "TFDS data_dir.",
          flag_values=fv,
      ),
      split=flags.DEFINE_string("split", "test", "Benchmark split.", flag_values=fv),
      limit=flags.DEFINE_integer("limit", None, "Evaluate only the first N items.", flag_values=fv),
      output=flags.DEFINE_string("output", "eval", "Output folder.", flag_values=fv),
      sampling=sampling,
      smartedit=smartedit,
      resolution=flags.DEFINE_integer(
          "resolution",
          0,
          "Long side; 0: 512 for real_edit, the images' own size otherwise.",
          flag_values=fv,
      ),
      rewards=flags.DEFINE_string(
          "rewards",
          "5,5,5",
          "Reward score settings separated by ';' "
          "(several make a sweep). Ignored for models without rewards.",
          flag_values=fv,
      ),
      judge_model=flags.DEFINE_string("judge_model", "gpt-4o", "Judge model.", flag_values=fv),
      judge=judge,
      toy_judge=flags.DEFINE_bool(
          "toy_judge",
          False,
          "Serve the toy judge on 127.0.0.1 and use it "
          "(the judge the benchmark's dataset registers: toy_edit).",
          flag_values=fv,
      ),
      concurrency=flags.DEFINE_integer("concurrency", 8, "Items judged at once.", flag_values=fv),
      retry_failed=flags.DEFINE_bool(
          "retry_failed",
          False,
          "Judge again the items whose judgement failed (results.jsonl keeps one line per item).",
          flag_values=fv,
      ),
  )


def parse_rewards(text: str):
  settings = []
  for part in filter(None, (p.strip() for p in text.split(";"))):
    try:
      settings.append(parse_scores(part))
    except ValueError as e:
      raise app.UsageError(f"--rewards: {e}") from e
  if not settings:
    raise app.UsageError("--rewards is empty")
  return settings


def reward_dir_name(scores) -> str:
  return "reward_" + "-".join(f"{s:g}" for s in scores)


def sweep_markdown(results: dict) -> str:
  """One row per reward setting, overall numbers."""
  head = ["reward"] + [f"{p} {k}" for p in evaluation.PERSPECTIVES for k in ("yes-rate", "score")]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, summary in results.items():
    s = summary["all"]
    cells = [name] + [
        c
        for p in evaluation.PERSPECTIVES
        for c in (f"{s[p]['yes_rate']:.1%}", f"{s[p]['score']:.2f}")
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


@contextlib.contextmanager
def judge_endpoint(fl: EvalFlags):
  if fl.toy_judge.value:
    hooks = registry.hooks_for(fl.benchmark.value, fl.data_dir.value)
    if hooks is None or hooks.serve_judge is None:
      raise app.UsageError(
          f"--toy_judge: benchmark {fl.benchmark.value} comes with no judge to serve "
          "(the toy world's toy_edit does)"
      )
    with hooks.serve_judge() as server:
      yield Endpoint(provider="compatible", base_url=server.base_url)
    return
  yield fl.judge.endpoint()


def command(fl: EvalFlags) -> dict:
  """The command with parsed flags; returns {setting name: summary}."""
  if not fl.model.value:
    raise app.UsageError("--model is required")
  rewards = parse_rewards(fl.rewards.value)
  benchmark, output = fl.benchmark.value, fl.output.value
  items = evaluation.load_benchmark(benchmark, fl.data_dir.value, fl.split.value, fl.limit.value)
  if not items:
    raise app.UsageError(f"{benchmark} {fl.split.value} has no items")
  resolution = fl.resolution.value or (
      512 if benchmark.startswith("real_edit") else max(items[0].original.shape[:2])
  )
  overrides = fl.smartedit.overrides()
  pipe = load_for_editing(fl.model.value, smartedit=overrides)
  editor = editor_for(
      pipe,
      EditSettings(**fl.sampling.edit_settings(), resolution=resolution),
      **fl.smartedit.llm_settings(),
  )
  # The folders a SmartEdit folder was completed with are part of the model (the caches' guard).
  model_id = os.path.abspath(fl.model.value)
  if isinstance(pipe, SmartEditPipeline) and overrides:
    model_id += " " + json.dumps(overrides, sort_keys=True)
  if not editor.is_reward:
    rewards = [None]
  start = time.time()
  results = {}
  with judge_endpoint(fl) as endpoint:
    judge = JudgeClient.from_endpoint(endpoint, RetryPolicy())
    for scores in rewards:
      name = "no reward" if scores is None else ",".join(f"{s:g}" for s in scores)
      out = output if len(rewards) == 1 else os.path.join(output, reward_dir_name(scores))
      try:
        results[name] = evaluation.evaluate(
            editor,
            items,
            judge,
            endpoint.request_model(fl.judge_model.value),
            out,
            reward_scores=scores,
            concurrency=fl.concurrency.value,
            batch_size=fl.sampling.batch_size.value,
            title=f"{benchmark} ({name})",
            model_id=model_id,
            retry_failed=fl.retry_failed.value,
        )
      except JudgeError as e:  # the judge looks down, or the key is wrong
        sys.exit(
            f"error: {judge.redact(str(e))}\nedits and finished judgements are saved in "
            f"{out}; when the judge answers again, rerun the same command to resume"
        )
      print(evaluation.summary_markdown(results[name], f"{benchmark}, reward {name}"))
      failed = results[name]["all"]["failed"]
      if failed:
        print(
            f"{failed} item(s) could not be judged (see 'error' in {out}/results.jsonl): "
            "rerun with --retry_failed to judge them again"
        )
  if len(rewards) > 1:
    with open(os.path.join(output, "sweep.md"), "w") as f:
      f.write(sweep_markdown(results))
    print(sweep_markdown(results))
  print(
      f"evaluated {len(items)} items x {len(rewards)} setting(s) in {time.time() - start:.0f} s; "
      f"reports in {output}"
  )
  return results


def run(argv: Sequence[str]) -> dict:
  """The command in this process: `argv` as on the command line, without the program name."""
  fv = flags.FlagValues()
  fl = define_flags(fv)
  fv(["mre.eval", *argv])
  return command(fl)


def main(argv):
  del argv
  command(_FLAGS)  # app.run exits with main's return value: None is success


if __name__ == "__main__":
  _FLAGS = define_flags()
  app.run(main)
