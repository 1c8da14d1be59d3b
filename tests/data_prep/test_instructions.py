import numpy as np
import pytest

from data_prep.toy import instructions, scenes, vocabulary
from data_prep.toy.instructions import Edit


def _all_instructions():
  for category, templates in instructions.TEMPLATES.items():
    new_colours = scenes.BACKGROUND_COLOURS if category == "background" else scenes.OBJECT_COLOURS
    for template in templates:
      for colour in scenes.OBJECT_COLOURS:
        for shape in scenes.SHAPES:
          for new in new_colours:
            text = template.format(colour=colour, shape=shape, new_colour=new)
            yield instructions.fix_articles(text), category
  for tone, templates in instructions.GLOBAL_TEMPLATES.items():
    for template in templates:
      yield template, "global"


def test_every_template_parses_back():
  seen = 0
  for text, category in _all_instructions():
    edit = instructions.parse_instruction(text)
    assert edit.category == category
    seen += 1
  assert seen > 1000
  assert instructions.parse_instruction("Turn the red circle blue.") == Edit(
      "local", "red", "circle", "blue"
  )
  assert instructions.parse_instruction("add an orange square") == Edit("add", "orange", "square")
  assert instructions.parse_instruction("make it black and white") == Edit(
      "global", tone="greyscale"
  )


def test_several_phrasings_per_category():
  for templates in list(instructions.TEMPLATES.values()) + list(
      instructions.GLOBAL_TEMPLATES.values()
  ):
    assert len(templates) >= 4


def test_sampled_edits_fit_their_scene_and_render_exactly():
  counts = dict.fromkeys(instructions.CATEGORIES, 0)
  for seed in range(300):
    rng = np.random.default_rng(seed)
    scene = scenes.random_scene(rng)
    sample = instructions.sample_edit(rng, scene)
    counts[sample.edit.category] += 1
    assert instructions.parse_instruction(sample.instruction) == sample.edit
    before, after = scenes.render(scene), scenes.render(sample.edited_scene)
    assert not np.array_equal(before, after)
    if sample.edit.category == "add":
      assert sample.edited_scene.objects[:-1] == scene.objects
  assert all(n > 20 for n in counts.values()), counts


def test_instructions_never_say_left_or_right():
  words = set(vocabulary.vocabulary())
  assert not words & {"left", "right"}  # the pipeline flips images horizontally


def test_vocabulary_covers_every_instruction():
  words = set(vocabulary.vocabulary())
  for text, _ in _all_instructions():
    assert set(vocabulary.words(text)) <= words, text
  assert len(words) < 120


def test_bad_instructions_are_named():
  with pytest.raises(ValueError, match="cannot parse instruction 'make it pop'"):
    instructions.parse_instruction("make it pop")
  with pytest.raises(ValueError, match="is a string"):
    instructions.parse_instruction(None)
  scene = scenes.Scene(
      16, scenes.Background(("white",)), (scenes.SceneObject("circle", "red", 2, 2, 6),)
  )
  with pytest.raises(ValueError, match="names a blue square, but the original has none"):
    instructions.apply_edit(scene, instructions.parse_instruction("remove the blue square"))
  with pytest.raises(ValueError, match="no remove fits this scene"):
    empty = scenes.Scene(16, scenes.Background(("white",)), ())
    instructions.sample_edit(np.random.default_rng(0), empty, category="remove")
