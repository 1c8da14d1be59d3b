"""What the toy judge answers: a verdict per perspective, and the failure texts it may write."""

from __future__ import annotations

import dataclasses

import numpy as np

from data_prep.toy import instructions
from mre.judging import prompts

PERSPECTIVES = ("following", "preserving", "quality")
NOTHING_WRONG = prompts.NOTHING_WRONG  # "no negative aspects", ... (the paper's texts)
YES_THRESHOLD = 4.0  # a perspective is a "yes" from this score on

# Every failure text the judge writes; the vocabulary of the toy world is read from these.
FAILURES = {
    # following, recolour
    "still_colour": "the {shape} is still {colour}",
    "wrong_colour": "the {shape} is {observed}, not {new_colour}",
    "part_recoloured": "only part of the {shape} turned {new_colour}",
    "misdirected_recolour": "the {colour} {shape} turned {new_colour} instead",
    # following, remove
    "still_there": "the {colour} {shape} is still there",
    "part_removed": "the {colour} {shape} is only partly removed",
    "recoloured_not_removed": "the {colour} {shape} turned {observed} instead of disappearing",
    "misdirected_remove": "the {colour} {shape} was removed instead",
    # following, add
    "not_added": "no {colour} {shape} was added",
    "added_wrong_colour": "the added {shape} is {observed}, not {colour}",
    "added_wrong_object": "a {observed} {observed_shape} was added, not a {colour} {shape}",
    "added_incomplete": "the added {shape} is incomplete",
    # following, background
    "background_unchanged": "the background is still {observed}",
    "background_wrong_colour": "the background is {observed}, not {new_colour}",
    "background_part": "only part of the background turned {new_colour}",
    # following, global
    "tone_missing": "the image is not {tone}",
    "tone_wrong": "the image is {observed_tone}, not {tone}",
    "tone_part": "only part of the image is {tone}",
    # preserving
    "background_changed": "the background colour changed",
    "object_moved": "the {colour} {shape} moved",
    "object_recoloured": "the {colour} {shape} turned {observed}",
    "object_missing": "the {colour} {shape} disappeared",
    "extra_object": "an extra {observed} object appeared",
    # quality
    "noise": "visible noise",
    "blur": "the image is blurry",
    "blockiness": "blocky artifacts",
    "banding": "colour banding",
}

# Raised whenever a change of the judge can change a verdict; cached judgements of another version
# are judged again (mre/experiments/toy_eval.py). 2: an edit that also hits another object fails
# preserving; ties between names no longer depend on the process' string hashing.
JUDGE_VERSION = 2

DONE_COVERAGE = 0.95  # following counts as complete from this fraction of the edited region on


@dataclasses.dataclass(frozen=True)
class Verdict:
  score: float  # 0..5, one decimal
  yes: bool
  failure: str  # what is wrong, or the perspective's "nothing wrong" text


@dataclasses.dataclass(frozen=True)
class Judgement:
  following: Verdict
  preserving: Verdict
  quality: Verdict

  @property
  def verdicts(self) -> tuple[Verdict, Verdict, Verdict]:
    return (self.following, self.preserving, self.quality)

  @property
  def scores(self) -> tuple[float, float, float]:
    return tuple(v.score for v in self.verdicts)

  @property
  def failures(self) -> tuple[str, str, str]:
    return tuple(v.failure for v in self.verdicts)


def failure_text(key: str, **fields) -> str:
  return instructions.fix_articles(FAILURES[key].format(**fields))


def coverage_score(coverage: float) -> float:
  """0 for (almost) nothing done, 5 from DONE_COVERAGE on, linear in between."""
  return 5.0 * float(np.clip((coverage - 0.05) / (DONE_COVERAGE - 0.05), 0.0, 1.0))


def make_verdict(perspective: str, score: float, problems: list[str]) -> Verdict:
  score = round(float(np.clip(score, 0.0, 5.0)), 1)
  return Verdict(score, score >= YES_THRESHOLD, "; ".join(problems) or NOTHING_WRONG[perspective])
