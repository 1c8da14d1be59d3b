"""Rewards: per editing triplet, a score (0..5) and a failure text for each of the three
perspectives, in the fixed order instruction following, detail preserving, generation quality.

Two file formats hold them:

  released RewardEdit20K JSON   {"<key>": [{"Score": 3, "Negative Prompt": "..."}, {...}, {...}]}
  annotation JSONL              one record per line, written by `python -m data_prep.annotate`:
      {"id": ..., "status": "done" | "failed", "instruction": ...,
       "perspectives": {"following": {"score": 4.0, "failure": "..."}, "preserving": ..., "quality": ...},
       "raw": {"following": ["<reply text>", ...], ...}, "model": ..., "prompt_version": ...,
       "usage": {"prompt_tokens": ..., "completion_tokens": ...}, "via": "online" | "batch" | ...,
       "reason": "<why it failed>" (failed records only), "time": ...}
      The annotator keeps one record per id: after writing an id again (`--retry_failed`) it
      rewrites the file atomically with the latest record of each id. A reader that finds several
      records of an id (a run killed before that rewrite) takes the last one, as `latest_records`
      and everything built on it do.

`load_rewards` reads either and validates every entry; bad entries come back with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from mre import jsonl
from mre.judging import prompts

PERSPECTIVES = prompts.PERSPECTIVES
MAX_SCORE = 5.0
RELEASED_SCORE, RELEASED_TEXT = "Score", "Negative Prompt"


class RewardError(ValueError):
  """An unusable reward entry; `kind` names the problem for build reports: bad_score,
  missing_perspective, missing_text, failed_annotation or bad_entry."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


@dataclasses.dataclass(frozen=True)
class Reward:
  scores: tuple[float, float, float]
  texts: tuple[str, str, str]


def make_reward(scores, texts) -> Reward:
  """A validated Reward; RewardError naming the first problem."""
  scores, texts = list(scores), list(texts)
  if len(scores) != 3 or len(texts) != 3:
    raise RewardError(
        "missing_perspective",
        f"a reward has 3 perspectives, got {len(scores)} scores and {len(texts)} texts",
    )
  checked = []
  for perspective, score, text in zip(PERSPECTIVES, scores, texts):
    checked.append(_score(score, perspective))
    if not isinstance(text, str) or not text.strip():
      raise RewardError("missing_text", f"{perspective}: the failure text is missing or empty")
  return Reward(tuple(checked), tuple(t.strip() for t in texts))


def _score(value: Any, perspective: str) -> float:
  # bool is an int in Python; a true/false "score" is a broken file, not a 1 or 0.
  if isinstance(value, bool) or not isinstance(value, (int, float, str)):
    raise RewardError("bad_score", f"{perspective}: the score {value!r} is not a number")
  try:
    score = float(value)
  except ValueError:
    raise RewardError("bad_score", f"{perspective}: the score {value!r} is not a number") from None
  if not math.isfinite(score) or not 0.0 <= score <= MAX_SCORE:
    raise RewardError("bad_score", f"{perspective}: the score {score} is outside 0..{MAX_SCORE:g}")
  return score


def from_released(entry) -> Reward:
  """From a released entry: a list of three {"Score": ..., "Negative Prompt": ...} dicts."""
  if not isinstance(entry, list):
    raise RewardError(
        "bad_entry", f"a released reward is a list of 3 dicts, got {type(entry).__name__}"
    )
  if len(entry) != 3:
    raise RewardError(
        "missing_perspective", f"a released reward has 3 perspectives, got {len(entry)}"
    )
  scores, texts = [], []
  for perspective, part in zip(PERSPECTIVES, entry):
    if not isinstance(part, dict):
      raise RewardError("bad_entry", f"{perspective}: expected a dict, got {str(part)[:80]!r}")
    if RELEASED_SCORE not in part:
      raise RewardError("bad_score", f"{perspective}: no '{RELEASED_SCORE}'")
    if RELEASED_TEXT not in part:
      raise RewardError("missing_text", f"{perspective}: no '{RELEASED_TEXT}'")
    scores.append(part[RELEASED_SCORE])
    texts.append(part[RELEASED_TEXT])
  return make_reward(scores, texts)


def to_released(reward: Reward) -> list[dict]:
  # Whole scores are written as integers, as in the released file.
  return [
      {RELEASED_SCORE: int(s) if float(s).is_integer() else s, RELEASED_TEXT: t}
      for s, t in zip(reward.scores, reward.texts)
  ]


def from_record(record: dict) -> Reward:
  """From an annotation JSONL record; failed or incomplete records raise RewardError."""
  if record.get("status") != "done":
    raise RewardError(
        "failed_annotation", f"the annotation failed: {record.get('reason', 'no reason recorded')}"
    )
  perspectives = record.get("perspectives")
  if not isinstance(perspectives, dict):
    raise RewardError("missing_perspective", "the record has no 'perspectives'")
  missing = [p for p in PERSPECTIVES if not isinstance(perspectives.get(p), dict)]
  if missing:
    raise RewardError(
        "missing_perspective", f"the record misses the perspective(s) {', '.join(missing)}"
    )
  return make_reward(
      [perspectives[p].get("score") for p in PERSPECTIVES],
      [perspectives[p].get("failure") for p in PERSPECTIVES],
  )


def read_records(path: str) -> tuple[list[dict], int]:
  """The records of an annotation JSONL in file order, and the byte length of its intact part.

  An unterminated or unparsable *last* line is a write cut short (a killed run): it is left out,
  and the returned length ends before it so a writer can cut it off. A bad line anywhere else is
  not something a crash leaves, so it raises ValueError (see `mre.jsonl.read_records`).
  """
  return jsonl.read_records(path, "an annotation record")


def latest_records(path: str) -> dict[str, dict]:
  """id -> the last record of that id (a torn last line is ignored)."""
  return {record["id"]: record for record in read_records(path)[0]}


def load_rewards(path: str) -> tuple[dict[str, Reward], dict[str, RewardError]]:
  """(id -> Reward, id -> why its entry is unusable) from a released JSON or an annotation JSONL
  (told apart by the .jsonl extension), in file order."""
  rewards, problems = {}, {}
  if path.endswith(".jsonl"):
    entries = ((key, record, from_record) for key, record in latest_records(path).items())
  else:
    with open(path, encoding="utf-8") as handle:
      data = json.load(handle)
    if not isinstance(data, dict):
      raise ValueError(
          f"{path}: the released reward file is a JSON object keyed by sample, "
          f"got {type(data).__name__}"
      )
    entries = ((key, entry, from_released) for key, entry in data.items())
  for key, entry, parse in entries:
    try:
      rewards[key] = parse(entry)
    except RewardError as error:
      problems[key] = error
  return rewards, problems
