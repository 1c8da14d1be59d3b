"""Instruction following, read from the edit view inside the region the instruction changes."""

from __future__ import annotations

from data_prep.toy import instructions, scenes
from data_prep.toy.judge.measure import Palette, majority
from data_prep.toy.judge.verdicts import (
    DONE_COVERAGE,
    Verdict,
    coverage_score,
    failure_text,
    make_verdict,
)
from data_prep.toy.judge.view import EditView, ObjectSeen


def following_verdict(view: EditView) -> Verdict:
  if view.edit.category == "add":
    return _following_add(view)
  coverage = view.target_coverage
  score = coverage_score(coverage)
  problems = [] if coverage >= DONE_COVERAGE else [_following_problem(view)]
  if problems:
    problems += [_misdirection_text(view, seen) for seen in view.misdirected]
  return make_verdict("following", score, problems)


def _following_problem(view: EditView) -> str:
  edit = view.edit
  inner = view.inner_region
  seen = majority(Palette.of(scenes.COLOURS, ("none",)).classify(view.smooth[inner]).tolist())
  if edit.category == "local":
    if seen == edit.new_colour:
      return failure_text("part_recoloured", shape=edit.shape, new_colour=edit.new_colour)
    if seen == edit.colour:
      return failure_text("still_colour", shape=edit.shape, colour=edit.colour)
    return failure_text("wrong_colour", shape=edit.shape, observed=seen, new_colour=edit.new_colour)
  if edit.category == "remove":
    if seen == edit.colour:
      key = "part_removed" if view.target_coverage >= 0.25 else "still_there"
      return failure_text(key, colour=edit.colour, shape=edit.shape)
    if seen in scenes.OBJECT_COLOURS:
      return failure_text(
          "recoloured_not_removed", colour=edit.colour, shape=edit.shape, observed=seen
      )
    return failure_text("part_removed", colour=edit.colour, shape=edit.shape)
  if edit.category == "background":
    if seen == edit.new_colour:
      return failure_text("background_part", new_colour=edit.new_colour)
    if seen in view.scene.background.colours:
      return failure_text("background_unchanged", observed=seen)
    return failure_text("background_wrong_colour", observed=seen, new_colour=edit.new_colour)
  # global
  tone = instructions.TONE_WORDS[edit.tone]
  if view.tone_seen == edit.tone:
    return failure_text("tone_part", tone=tone)
  if view.tone_seen == "none":
    return failure_text("tone_missing", tone=tone)
  return failure_text(
      "tone_wrong", observed_tone=instructions.TONE_WORDS[view.tone_seen], tone=tone
  )


def _misdirection_text(view: EditView, seen: ObjectSeen) -> str:
  key = "misdirected_recolour" if view.edit.category == "local" else "misdirected_remove"
  return failure_text(
      key, colour=seen.obj.colour, shape=seen.obj.shape, new_colour=view.edit.new_colour
  )


def _following_add(view: EditView) -> Verdict:
  edit, found = view.edit, view.added
  if found is None:
    return make_verdict(
        "following", 0.0, [failure_text("not_added", colour=edit.colour, shape=edit.shape)]
    )
  colour_ok, shape_ok = found["colour"] == edit.colour, found["shape"] == edit.shape
  completeness = found["completeness"]
  if not colour_ok and not shape_ok:
    return make_verdict(
        "following",
        0.0,
        [
            failure_text(
                "added_wrong_object",
                observed=found["colour"],
                observed_shape=found["shape"],
                colour=edit.colour,
                shape=edit.shape,
            )
        ],
    )
  if not colour_ok:
    return make_verdict(
        "following",
        0.5,
        [
            failure_text(
                "added_wrong_colour", shape=edit.shape, observed=found["colour"], colour=edit.colour
            )
        ],
    )
  if not shape_ok:
    return make_verdict(
        "following",
        1.0,
        [
            failure_text(
                "added_wrong_object",
                observed=found["colour"],
                observed_shape=found["shape"],
                colour=edit.colour,
                shape=edit.shape,
            )
        ],
    )
  # A found shape loses a few border pixels to noise or blur: 90% of it counts as complete.
  score = coverage_score(min(1.0, completeness / 0.9))
  problems = (
      []
      if completeness >= 0.9 * DONE_COVERAGE
      else [failure_text("added_incomplete", shape=edit.shape)]
  )
  return make_verdict("following", score, problems)
