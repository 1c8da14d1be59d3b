"""The toy judge: what GPT-4o does in the paper, done by measurement in the toy world.

It sees only what GPT-4o would see, (instruction, original image, edited image), and answers the
three perspectives in the fixed order (instruction following, detail preserving, generation
quality), each as a 0-5 score, a yes/no and a short text naming what is wrong.

How it measures, so that each failure shows up on its own perspective only:
  * The original is a clean rendering, so its scene is recovered exactly; the instruction is parsed
    from the templates and the ideal edit rendered. The edited image may be anything (a flawed
    target, a blurry or noisy model output at another size): colours are read from its 3x3 vector
    median, which removes pixel noise but keeps flat regions and their edges.
  * Following is read inside the region the instruction changes, a pixel or two in from its border
    (a blurry border is a quality matter): the share of pixels nearer the ideal edit's colour than
    the original's or any other named colour (for a global edit: showing the asked tone). An add
    has no fixed place: the judge looks for a new shape on the background and checks its colour,
    its shape and how complete it is.
  * Preserving is read outside that region: every untouched object must still be where it was
    (centroid shift < 1 px) in its colour, the untouched background must keep its colour (mean
    colour error, averaged so zero-mean noise, blocks and bands cancel) and no extra shape may
    appear. An untouched object that got the instructed change instead of the target (the
    target not done) is a following failure ("the blue square turned red instead"), not a
    preserving one; got as well as the target, it is a preserving failure.
  * Quality is read from the edited image alone: the residual between it and its nearest
    palette-exact rendering, split into pixel noise (image minus its median), blur (residual left
    at colour edges), blockiness (residual constant on the aligned block grid) and banding
    (residual constant along rows or columns).

Modules: `verdicts` (what it answers, the failure texts), `measure` (image reading, denoising,
colour names, masks, shape fitting), `view` (the measurements following and preserving share),
`following`, `preserving` and `quality` (one perspective each).
"""

from __future__ import annotations

from data_prep.toy.judge.following import following_verdict
from data_prep.toy.judge.measure import to_rgb_array
from data_prep.toy.judge.preserving import preserving_verdict
from data_prep.toy.judge.quality import judge_quality, quality_levels
from data_prep.toy.judge.verdicts import (
    FAILURES,
    JUDGE_VERSION,
    NOTHING_WRONG,
    PERSPECTIVES,
    YES_THRESHOLD,
    Judgement,
    Verdict,
)
from data_prep.toy.judge.view import EditView

__all__ = [
    "FAILURES",
    "JUDGE_VERSION",
    "NOTHING_WRONG",
    "PERSPECTIVES",
    "YES_THRESHOLD",
    "Judgement",
    "Verdict",
    "judge",
    "judge_following",
    "judge_perspective",
    "judge_preserving",
    "judge_quality",
    "quality_levels",
    "to_rgb_array",
]


def judge(instruction: str, original, edited) -> Judgement:
  """All three perspectives. Images: uint8 [H, W, 3] arrays, PIL images or PNG bytes."""
  view = EditView(instruction, original, edited)
  return Judgement(
      following_verdict(view), preserving_verdict(view), judge_quality(view.edited_uint8)
  )


def judge_following(instruction: str, original, edited) -> Verdict:
  return following_verdict(EditView(instruction, original, edited))


def judge_preserving(instruction: str, original, edited) -> Verdict:
  return preserving_verdict(EditView(instruction, original, edited))


def judge_perspective(perspective: str, instruction: str, original, edited) -> Verdict:
  if perspective == "quality":
    return judge_quality(edited)
  if perspective not in PERSPECTIVES:
    raise ValueError(f"unknown perspective {perspective!r}; expected one of {PERSPECTIVES}")
  verdict = following_verdict if perspective == "following" else preserving_verdict
  return verdict(EditView(instruction, original, edited))
