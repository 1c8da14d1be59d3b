"""The trial command's parts (mre/experiments/toy_trial.py); its training and judging are the
replication's, run end to end in test_toy_replication.py."""

import pytest

from mre.experiments import recipes, stats, toy_eval, toy_trial


def test_overrides_parse_literals_and_bare_words():
  got = recipes.parse_overrides(
      ["train.edit_weight=10.0", "model.scratch.unet_channels=(16, 32)", "data.target_key=ideal"]
  )
  assert got == {
      "train.edit_weight": 10.0,
      "model.scratch.unet_channels": (16, 32),
      "data.target_key": "ideal",
  }
  with pytest.raises(ValueError, match="KEY=VALUE"):
    recipes.parse_overrides(["train.lr"])


def _record(category, following, preserving="nothing wrong"):
  verdict = lambda failure: {"yes": failure is None, "score": 5.0, "failure": failure}  # noqa
  return {
      "category": category,
      "following": verdict(following),
      "preserving": verdict(None if preserving == "nothing wrong" else preserving),
      "quality": verdict(None),
  }


def test_failures_count_the_no_verdicts_per_category_and_perspective():
  records = [
      _record("local", "the circle is still red"),
      _record("local", "the circle is still red", "the background colour changed"),
      _record("local", "the square is still blue"),
      _record("local", None),
      _record("add", "no red square was added"),
  ]
  got = stats.failures(records, top=1)
  assert got == {
      "local": {
          "following": [("the circle is still red", 2)],
          "preserving": [("the background colour changed", 1)],
      },
      "add": {"following": [("no red square was added", 1)]},
  }
  text = toy_trial.format_trial(
      {
          "steps": 3,
          "target": "ideal",
          "seed": 0,
          "overrides": {},
          "eval": toy_eval.eval_settings(),
          "summary": {
              "all": {p: {"yes_rate": 0.25} for p in ("following", "preserving", "quality")}
              | {"n": 4}
          },
          "failures": got,
      }
  )
  assert "all           4      25.0%" in text and "'the circle is still red' x2" in text


def test_eval_settings_replace_fields_and_tag_their_folders():
  default = toy_eval.eval_settings(sampler=None, steps=None)
  assert default == toy_eval.EVAL_SETTINGS and toy_eval.settings_tag(default) == ""
  other = toy_eval.eval_settings(sampler="euler_ancestral", text_scale=3.0)
  assert other == {**toy_eval.EVAL_SETTINGS, "sampler": "euler_ancestral", "text_scale": 3.0}
  assert toy_eval.settings_tag(other) == "euler_ancestral-20-sT3-sI1"
  with pytest.raises(ValueError, match="seed"):
    toy_eval.eval_settings(seed=1)
