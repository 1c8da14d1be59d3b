"""Detail preserving, read from the edit view outside the region the instruction changes."""

from __future__ import annotations

import numpy as np

from data_prep.toy import scenes
from data_prep.toy.judge.measure import dilate, nearest
from data_prep.toy.judge.verdicts import Verdict, failure_text, make_verdict
from data_prep.toy.judge.view import EditView


def preserving_verdict(view: EditView) -> Verdict:
  penalties, problems = [], []
  misdirected = view.misdirected
  for seen in view.objects_seen:
    if any(seen is m for m in misdirected):  # a following failure, already named there
      continue
    o = seen.obj
    if seen.status == "moved":
      penalties.append(min(0.8, 0.25 * seen.shift))
      problems.append(failure_text("object_moved", colour=o.colour, shape=o.shape))
    elif seen.status == "recoloured":
      penalties.append(0.7)
      problems.append(
          failure_text("object_recoloured", colour=o.colour, shape=o.shape, observed=seen.observed)
      )
    elif seen.status == "missing":
      penalties.append(0.8)
      problems.append(failure_text("object_missing", colour=o.colour, shape=o.shape))
  if view.edit.category != "background":
    shift = _background_shift(view)
    penalty = float(np.clip((shift - 20.0) / 40.0, 0.0, 0.9))
    if penalty >= 0.1:
      penalties.append(penalty)
      problems.append(failure_text("background_changed"))
  if view.edit.category in ("local", "remove", "add"):
    for extra in _extra_shapes(view):
      penalties.append(0.5)
      problems.append(failure_text("extra_object", observed=extra["colour"]))
  return make_verdict("preserving", 5.0 * (1.0 - min(1.0, sum(penalties))), problems)


def _untouched_background(view: EditView) -> np.ndarray:
  keep = (view.labels < 0) & ~dilate(view.objects_mask, 2) & ~dilate(view.region, 2)
  for seen in view.objects_seen:
    if seen.pixels is not None:
      keep &= ~dilate(seen.pixels, 1)
  return keep


def _background_shift(view: EditView) -> float:
  """RGB length of the untouched background's mean colour error.

  The error is averaged per row and per column first and the smaller of the two results is
  kept: zero-mean stripes (banding) cancel along their own axis even where objects hide part
  of the background, while a real shift shows in both.
  """
  keep = _untouched_background(view)
  errors = np.full(view.smooth.shape, np.nan, np.float32)
  for k, name in enumerate(view.scene.background.colours):
    part = keep & (view.labels == -1 - k)
    if not part.any():
      continue
    accepted = np.array(
        [scenes.tone_colour(scenes.COLOURS[name], t) for t in view.acceptable_tones], np.float32
    )
    pixels = view.smooth[part]
    errors[part] = pixels - accepted[nearest(pixels, accepted)[0]]
  if not keep.any():
    return 0.0
  shifts = []
  for axis in (0, 1):
    counts = np.sum(~np.isnan(errors[..., 0]), axis=axis)
    sums = np.nansum(errors, axis=axis)
    line_means = (sums / np.maximum(counts, 1)[:, None])[counts >= 2]
    if len(line_means):
      shifts.append(float(np.linalg.norm(line_means.mean(0))))
  return min(shifts) if shifts else 0.0


def _extra_shapes(view: EditView) -> list[dict]:
  near_edit = dilate(view.region, 1)
  return [s for s in view.new_shapes if s is not view.added and not (s["pixels"] & near_edit).any()]
