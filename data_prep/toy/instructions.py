"""Editing instructions from templates: sampling one for a scene, parsing one back, applying it.

Categories follow Real-Edit where a flat-colour world has an equivalent: local (recolour an object),
remove, add, background and global (a tone change of the whole image). Every phrase is a template
over a closed word list, so the judge can parse any instruction exactly and the word vocabulary is
known in advance (see `vocabulary.py`). No template says left or right: the training pipeline flips
images horizontally, and a flip must not change what an instruction means.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Optional

import numpy as np

from data_prep.toy import scenes
from data_prep.toy.scenes import Scene

CATEGORIES = ("local", "remove", "add", "background", "global")

TEMPLATES = {
    "local": (
        "turn the {colour} {shape} {new_colour}",
        "make the {colour} {shape} {new_colour}",
        "change the colour of the {colour} {shape} to {new_colour}",
        "paint the {colour} {shape} {new_colour}",
        "colour the {colour} {shape} {new_colour}",
    ),
    "remove": (
        "remove the {colour} {shape}",
        "delete the {colour} {shape}",
        "take away the {colour} {shape}",
        "get rid of the {colour} {shape}",
        "erase the {colour} {shape}",
    ),
    "add": (
        "add a {colour} {shape}",
        "draw a {colour} {shape}",
        "put a {colour} {shape} in the picture",
        "insert a {colour} {shape}",
    ),
    "background": (
        "make the background {new_colour}",
        "change the background to {new_colour}",
        "turn the background {new_colour}",
        "paint the background {new_colour}",
    ),
}
GLOBAL_TEMPLATES = {
    "darker": (
        "make it darker",
        "darken the picture",
        "make the picture darker",
        "turn the brightness down",
    ),
    "lighter": (
        "make it lighter",
        "brighten the picture",
        "make the picture brighter",
        "turn the brightness up",
    ),
    "greyscale": (
        "make it black and white",
        "make the picture black and white",
        "turn the picture to greyscale",
        "drain the colour from the picture",
    ),
}
# How failure texts name a tone ("the image is not darker").
TONE_WORDS = {
    "none": "unchanged",
    "darker": "darker",
    "lighter": "lighter",
    "greyscale": "black and white",
}

DEFAULT_CATEGORY_WEIGHTS = {
    "local": 0.3,
    "remove": 0.2,
    "add": 0.2,
    "background": 0.15,
    "global": 0.15,
}

# A global tone only counts as an edit when it visibly changes at least half of the image.
_MIN_TONE_CHANGE = 60.0


@dataclasses.dataclass(frozen=True)
class Edit:
  """What an instruction asks for.

  local: recolour the (colour, shape) object to new_colour; remove: delete the (colour, shape)
  object; add: a new (colour, shape) object anywhere free; background: a plain new_colour
  background; global: render everything in `tone`.
  """

  category: str
  colour: Optional[str] = None
  shape: Optional[str] = None
  new_colour: Optional[str] = None
  tone: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class EditSample:
  edit: Edit
  instruction: str
  edited_scene: Scene  # the perfect edit


def normalise(instruction: str) -> str:
  return " ".join(re.sub(r"[.!?]+$", "", instruction.strip().lower()).split())


def fix_articles(text: str) -> str:
  """Templates write "a {colour}"; English wants "an orange"."""
  return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _compile_parsers():
  alternatives = {
      "colour": "|".join(scenes.OBJECT_COLOURS),
      "shape": "|".join(scenes.SHAPES),
  }
  parsers = []
  for category, templates in TEMPLATES.items():
    new_colours = scenes.BACKGROUND_COLOURS if category == "background" else scenes.OBJECT_COLOURS
    fields = dict(alternatives, new_colour="|".join(new_colours))
    for template in templates:
      pattern = re.escape(template)
      for field, options in fields.items():
        pattern = pattern.replace(re.escape("{" + field + "}"), f"(?P<{field}>{options})")
      parsers.append((re.compile(f"^{pattern}$"), category, None))
  for tone, templates in GLOBAL_TEMPLATES.items():
    for template in templates:
      parsers.append((re.compile(f"^{re.escape(template)}$"), "global", tone))
  return parsers


_PARSERS = _compile_parsers()


def parse_instruction(instruction: str) -> Edit:
  """The Edit an instruction asks for; ValueError if it is not one of the toy templates."""
  if not isinstance(instruction, str):
    raise ValueError(f"an instruction is a string, got {type(instruction).__name__}")
  text = re.sub(r"\ban\b", "a", normalise(instruction))  # templates are written with "a"
  for pattern, category, tone in _PARSERS:
    match = pattern.match(text)
    if match:
      return Edit(category, tone=tone, **match.groupdict())
  raise ValueError(
      f"cannot parse instruction {instruction!r}: the toy judge understands only the "
      "toy-world templates (data_prep/toy/instructions.py)"
  )


def check_applicable(edit: Edit, scene: Scene) -> None:
  """Raises ValueError when the instruction does not fit the original scene."""
  if edit.category in ("local", "remove") and scene.find(edit.colour, edit.shape) is None:
    raise ValueError(
        f"the instruction names a {edit.colour} {edit.shape}, " "but the original has none"
    )
  if scene.tone != "none":
    raise ValueError("the original must be an untoned scene")


def apply_edit(scene: Scene, edit: Edit, new_object: Optional[scenes.SceneObject] = None) -> Scene:
  """The perfect edit of `scene`; an add needs the placed `new_object`."""
  check_applicable(edit, scene)
  if edit.category == "local":
    target = scene.find(edit.colour, edit.shape)
    objects = tuple(
        dataclasses.replace(o, colour=edit.new_colour) if o is target else o for o in scene.objects
    )
    return dataclasses.replace(scene, objects=objects)
  if edit.category == "remove":
    target = scene.find(edit.colour, edit.shape)
    return dataclasses.replace(scene, objects=tuple(o for o in scene.objects if o is not target))
  if edit.category == "add":
    if new_object is None or (new_object.colour, new_object.shape) != (edit.colour, edit.shape):
      raise ValueError("an add edit needs the placed new object")
    return dataclasses.replace(scene, objects=scene.objects + (new_object,))
  if edit.category == "background":
    return dataclasses.replace(scene, background=scenes.Background((edit.new_colour,)))
  if edit.category == "global":
    return dataclasses.replace(scene, tone=edit.tone)
  raise ValueError(f"unknown edit category {edit.category!r}")


def instruction_text(edit: Edit, rng: np.random.Generator) -> str:
  if edit.category == "global":
    templates = GLOBAL_TEMPLATES[edit.tone]
  else:
    templates = TEMPLATES[edit.category]
  template = templates[int(rng.integers(len(templates)))]
  return fix_articles(
      template.format(colour=edit.colour, shape=edit.shape, new_colour=edit.new_colour)
  )


def tone_is_visible(scene: Scene, tone: str) -> bool:
  before = scenes.render(scene).astype(np.float32)
  after = scenes.render(dataclasses.replace(scene, tone=tone)).astype(np.float32)
  return np.mean(np.linalg.norm(after - before, axis=-1) >= _MIN_TONE_CHANGE) >= 0.5


def candidate_edits(scene: Scene, category: str) -> list[Edit]:
  """All edits of a category that make sense for the scene (an add still needs a free place)."""
  taken = {(o.colour, o.shape) for o in scene.objects}
  if category == "local":
    return [
        Edit("local", o.colour, o.shape, new_colour=c)
        for o in scene.objects
        for c in scenes.OBJECT_COLOURS
        if c != o.colour and (c, o.shape) not in taken
    ]
  if category == "remove":
    return [Edit("remove", o.colour, o.shape) for o in scene.objects]
  if category == "add":
    return [
        Edit("add", c, s)
        for c in scenes.OBJECT_COLOURS
        for s in scenes.SHAPES
        if (c, s) not in taken
    ]
  if category == "background":
    current = scene.background.colours if scene.background.split == "none" else ()
    return [Edit("background", new_colour=c) for c in scenes.BACKGROUND_COLOURS if c not in current]
  if category == "global":
    return [Edit("global", tone=t) for t in scenes.TONES[1:] if tone_is_visible(scene, t)]
  raise ValueError(f"unknown edit category {category!r}")


def sample_edit(
    rng: np.random.Generator,
    scene: Scene,
    category_weights: Mapping[str, float] = DEFAULT_CATEGORY_WEIGHTS,
    category: Optional[str] = None,
) -> EditSample:
  """A random instruction for the scene and its perfect edit.

  With `category` given, that category or ValueError; otherwise categories are drawn by weight
  among those possible for this scene.
  """
  categories = [category] if category else [c for c in CATEGORIES if category_weights.get(c, 0) > 0]
  while categories:
    weights = np.array([category_weights.get(c, 1.0) for c in categories], np.float64)
    chosen = categories[int(rng.choice(len(categories), p=weights / weights.sum()))]
    options = candidate_edits(scene, chosen)
    if options:
      edit = options[int(rng.integers(len(options)))]
      new_object = None
      if edit.category == "add":
        new_object = scenes.place_object(rng, scene, edit.shape, edit.colour)
      if edit.category != "add" or new_object is not None:
        return EditSample(edit, instruction_text(edit, rng), apply_edit(scene, edit, new_object))
    categories.remove(chosen)
  raise ValueError(f"no {category or 'instruction'} fits this scene")
