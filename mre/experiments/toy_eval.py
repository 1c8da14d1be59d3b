"""One row of the toy replication: an editor edits the test items and the toy judge judges them.

Edits are cached as PNG and judgements appended to `results.jsonl` one line per item, guarded by a
provenance file, so an interrupted evaluation resumes and a changed model or setting is refused
(the machinery of `mre.evaluation`). The judge runs in process: the same measurements the toy
judge server answers with, without HTTP.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np
from absl import flags, logging
from PIL import Image
from tqdm import tqdm

from data_prep.toy import judge as toy_judge
from mre import evaluation
from mre.editor import EditSettings
from mre.experiments import stats
from mre.model_io.folders import load_for_editing
from mre.model_io.smartedit_folder import EDITOR_JSON, is_editor_folder
from mre.smartedit_editor import editor_for

# A SmartEdit editor's LLM answers greedily, as the toy trainer's validation does: sampled, an
# answer that misses an <img_k> token makes the editor refuse its whole batch.
SMARTEDIT_TEMPERATURE = 0.0
# Edit settings of every row: DDIM, 20 steps, s_T 2, s_I 1 (what the toy editors are measured at).
EVAL_SETTINGS = dict(steps=20, sampler="ddim", text_scale=2.0, image_scale=1.0, seed=42)
SETTING_FLAGS = ("sampler", "steps", "text_scale", "image_scale")  # what commands may change


def eval_settings(**changes) -> dict:
  """EVAL_SETTINGS with the given fields replaced (a None value keeps the default)."""
  unknown = set(changes) - set(SETTING_FLAGS)
  if unknown:
    raise ValueError(f"unknown evaluation settings {sorted(unknown)}; known: {SETTING_FLAGS}")
  return {**EVAL_SETTINGS, **{k: v for k, v in changes.items() if v is not None}}


def settings_tag(settings: dict) -> str:
  """A folder-name tag of non-default settings ("euler_ancestral-20-sT3-sI1"; "" for the
  defaults): edits and reports at other settings go to their own folders beside the default's."""
  if settings == EVAL_SETTINGS:
    return ""
  return (
      f"{settings['sampler']}-{settings['steps']}-sT{settings['text_scale']:g}"
      f"-sI{settings['image_scale']:g}"
  )


def define_eval_flags():
  """--eval_sampler, --eval_steps, --eval_text_scale, --eval_image_scale (default: toy_eval's)."""
  flags.DEFINE_enum(
      "eval_sampler", None, ["ddim", "euler_ancestral", "euler", "dpmpp_2m"], "Edit sampler."
  )
  flags.DEFINE_integer("eval_steps", None, "Sampling steps of every edit.")
  flags.DEFINE_float("eval_text_scale", None, "Instruction guidance s_T.")
  flags.DEFINE_float("eval_image_scale", None, "Image guidance s_I.")


def settings_from_flags() -> dict:
  return eval_settings(**{k: getattr(flags.FLAGS, f"eval_{k}") for k in SETTING_FLAGS})


def load_items(config, data_dir: str, limit: int = 0):
  """The test items of the config's toy_edit dataset (the split lists each scene's 5 edits
  together, so any prefix holds every category about equally)."""
  return evaluation.load_benchmark(
      f"toy_edit/{config.data.config}", data_dir, "test", limit=limit or None
  )


def judge_record(item: evaluation.BenchItem, edited_path: str) -> dict:
  edited = np.asarray(Image.open(edited_path).convert("RGB"))
  verdict = toy_judge.judge(item.instruction, item.original, edited)
  record = {
      "id": item.id,
      "category": item.category,
      "instruction": item.instruction,
      "status": "ok",
      "judge_version": toy_judge.JUDGE_VERSION,
  }
  for name, v in zip(stats.PERSPECTIVES, verdict.verdicts):
    record[name] = {"yes": bool(v.yes), "score": float(v.score), "failure": v.failure}
  return record


def judge_items(items, paths: dict, results_path: str) -> dict:
  """Judges the items not in `results_path` yet, or judged there by another version of the toy
  judge (one appended line each; the latest line of an id counts); returns all records."""
  done = evaluation.read_results(results_path)
  todo = [
      it
      for it in items
      if it.id not in done or done[it.id].get("judge_version") != toy_judge.JUDGE_VERSION
  ]
  if todo:
    if len(todo) < len(items):
      logging.info(
          "%s: judging %d edits (new, or judged by another judge version)", results_path, len(todo)
      )
    with open(results_path, "a") as out:
      for item in tqdm(todo, desc="judging", unit="item", leave=False):
        record = judge_record(item, paths[item.id])
        out.write(json.dumps(record) + "\n")
        out.flush()
        done[item.id] = record
  return {it.id: done[it.id] for it in items}


def evaluate_row(
    export: str,
    items,
    out_dir: str,
    resolution: int,
    *,
    reward: Optional[tuple] = None,
    reward_scale: Optional[float] = None,
    reward_negative: Optional[tuple] = None,
    reward_negative_texts: Optional[tuple] = None,
    reward_texts: Optional[tuple] = None,
    batch_size: int = 70,
    settings: Optional[dict] = None,
) -> dict:
  """{"summary": per-category stats with 95% intervals, "paths": {id: edited PNG}, "records":
  {id: judged record}}.

  `reward` is the score condition of a reward model (texts: `reward_texts`, by default the ones
  that say nothing is wrong); `reward_scale`
  adds reward guidance (a model trained with reward dropout), or, with `reward_negative` (scores),
  guidance away from that reward (any reward model; its texts `reward_negative_texts`, None
  entries keeping the perfect ones); `settings` replaces EVAL_SETTINGS.
  """
  os.makedirs(out_dir, exist_ok=True)
  smartedit = is_editor_folder(export)
  marker = EDITOR_JSON if smartedit else "mre_model.json"
  settings = EditSettings(
      resolution=resolution,
      reward_scale=reward_scale,
      reward_negative_scores=tuple(reward_negative) if reward_negative is not None else None,
      reward_negative_texts=(
          tuple(reward_negative_texts) if reward_negative_texts is not None else None
      ),
      **(settings or EVAL_SETTINGS),
  )
  evaluation.check_provenance(
      out_dir,
      {
          "model": os.path.abspath(export),
          # a retrained model is another model
          "model_time": os.path.getmtime(os.path.join(export, marker)),
          **({"llm_temperature": SMARTEDIT_TEMPERATURE} if smartedit else {}),
          # (a field that is unset is left out, so caches made before it existed stay valid)
          "settings": {
              k: v
              for k, v in dataclasses.asdict(settings).items()
              if not (k in ("reward_negative_scores", "reward_negative_texts") and v is None)
          },
          "reward": reward,
          **({"reward_texts": list(reward_texts)} if reward_texts is not None else {}),
          "judge": "toy judge, in process",
      },
  )
  results_path = os.path.join(out_dir, "results.jsonl")
  paths = {
      it.id: os.path.join(out_dir, "images", evaluation.safe_name(it.id) + ".png") for it in items
  }
  if not all(os.path.exists(p) for p in paths.values()):
    editor = editor_for(load_for_editing(export), settings, temperature=SMARTEDIT_TEMPERATURE)
    make_reward = None
    if reward is not None and editor.is_reward:
      make_reward = lambda n: editor.reward_inputs(  # noqa: E731
          n, scores=tuple(reward), texts=reward_texts
      )
    paths = evaluation.edit_items(
        editor, items, os.path.join(out_dir, "images"), batch_size=batch_size, reward=make_reward
    )
  records = judge_items(items, paths, results_path)
  return {
      "summary": stats.summarize_with_ci(list(records.values())),
      "paths": paths,
      "records": records,
  }
