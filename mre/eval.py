"""Evaluate an editor on a benchmark with a judge: `python -m mre.eval --model DIR --benchmark ...`.

  # Real-Edit with GPT-4o (OPENAI_API_KEY in the environment), the paper's settings
  python -m mre.eval --model=runs/reward/export --benchmark=real_edit --data_dir=/data/tfds \\
      --output=eval/real_edit
  # the toy test split with the toy judge (started in-process), and a reward sweep
  python -m mre.eval --model=runs/reward_toy/export --benchmark=toy_edit/24px --toy_judge \\
      --rewards="5,5,5;3,3,3;1,1,1;1,5,5;5,1,5;5,5,1" --output=eval/toy

Outputs per setting: images/ (cached edits), results.jsonl (per item; resumable), summary.md,
summary.csv, summary.json and gallery.html; a sweep adds sweep.md comparing the settings.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

from absl import app, flags

from mre import cli_flags, evaluation
from mre.data import registry
from mre.editor import EditSettings, Editor
from mre.judging.client import Endpoint, JudgeClient, JudgeError, RetryPolicy
from mre.model_io.folders import load_any
from mre.models.reward_config import parse_scores

_MODEL = flags.DEFINE_string("model", None, "mre checkpoint or diffusers pipeline folder.")
_BENCHMARK = flags.DEFINE_string(
    "benchmark", "real_edit", "TFDS benchmark: real_edit, " "toy_edit/24px, ..."
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", os.path.expanduser("~/tensorflow_datasets"), "TFDS data_dir."
)
_SPLIT = flags.DEFINE_string("split", "test", "Benchmark split.")
_LIMIT = flags.DEFINE_integer("limit", None, "Evaluate only the first N items.")
_OUTPUT = flags.DEFINE_string("output", "eval", "Output folder.")
_SAMPLING = cli_flags.define_sampling_flags(batch_size=16)
_RESOLUTION = flags.DEFINE_integer(
    "resolution", 0, "Long side; 0: 512 for real_edit, the " "images' own size otherwise."
)
_REWARDS = flags.DEFINE_string(
    "rewards",
    "5,5,5",
    "Reward score settings separated by ';' "
    "(several make a sweep). Ignored for models without rewards.",
)
_JUDGE_MODEL = flags.DEFINE_string("judge_model", "gpt-4o", "Judge model.")
_JUDGE = cli_flags.define_judge_flags()
flags.adopt_module_key_flags(cli_flags)  # listed by --help with the command's own
_TOY_JUDGE = flags.DEFINE_bool(
    "toy_judge",
    False,
    "Serve the toy judge on 127.0.0.1 and use it "
    "(the judge the benchmark's dataset registers: toy_edit).",
)
_CONCURRENCY = flags.DEFINE_integer("concurrency", 8, "Items judged at once.")
_RETRY_FAILED = flags.DEFINE_bool(
    "retry_failed",
    False,
    "Judge again the items whose judgement " "failed (results.jsonl keeps one line per item).",
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
def judge_endpoint():
  if _TOY_JUDGE.value:
    hooks = registry.hooks_for(_BENCHMARK.value, _DATA_DIR.value)
    if hooks is None or hooks.serve_judge is None:
      raise app.UsageError(
          f"--toy_judge: benchmark {_BENCHMARK.value} comes with no judge to serve "
          "(the toy world's toy_edit does)"
      )
    with hooks.serve_judge() as server:
      yield Endpoint(provider="compatible", base_url=server.base_url)
    return
  yield _JUDGE.endpoint()


def main(argv):
  del argv
  if not _MODEL.value:
    raise app.UsageError("--model is required")
  rewards = parse_rewards(_REWARDS.value)
  items = evaluation.load_benchmark(_BENCHMARK.value, _DATA_DIR.value, _SPLIT.value, _LIMIT.value)
  if not items:
    raise app.UsageError(f"{_BENCHMARK.value} {_SPLIT.value} has no items")
  resolution = _RESOLUTION.value or (
      512 if _BENCHMARK.value.startswith("real_edit") else max(items[0].original.shape[:2])
  )
  pipe = load_any(_MODEL.value)
  editor = Editor(pipe, EditSettings(**_SAMPLING.edit_settings(), resolution=resolution))
  if not editor.is_reward:
    rewards = [None]
  start = time.time()
  results = {}
  with judge_endpoint() as endpoint:
    judge = JudgeClient.from_endpoint(endpoint, RetryPolicy())
    for scores in rewards:
      name = "no reward" if scores is None else ",".join(f"{s:g}" for s in scores)
      out = (
          _OUTPUT.value
          if len(rewards) == 1
          else os.path.join(_OUTPUT.value, reward_dir_name(scores))
      )
      try:
        results[name] = evaluation.evaluate(
            editor,
            items,
            judge,
            endpoint.request_model(_JUDGE_MODEL.value),
            out,
            reward_scores=scores,
            concurrency=_CONCURRENCY.value,
            batch_size=_SAMPLING.batch_size.value,
            title=f"{_BENCHMARK.value} ({name})",
            model_id=os.path.abspath(_MODEL.value),
            retry_failed=_RETRY_FAILED.value,
        )
      except JudgeError as e:  # the judge looks down, or the key is wrong
        sys.exit(
            f"error: {judge.redact(str(e))}\nedits and finished judgements are saved in "
            f"{out}; when the judge answers again, rerun the same command to resume"
        )
      print(evaluation.summary_markdown(results[name], f"{_BENCHMARK.value}, reward {name}"))
      failed = results[name]["all"]["failed"]
      if failed:
        print(
            f"{failed} item(s) could not be judged (see 'error' in {out}/results.jsonl): "
            "rerun with --retry_failed to judge them again"
        )
  if len(rewards) > 1:
    with open(os.path.join(_OUTPUT.value, "sweep.md"), "w") as f:
      f.write(sweep_markdown(results))
    print(sweep_markdown(results))
  print(
      f"evaluated {len(items)} items x {len(rewards)} setting(s) in {time.time() - start:.0f} s; "
      f"reports in {_OUTPUT.value}"
  )


if __name__ == "__main__":
  app.run(main)
