"""`real_edit`: the Real-Edit benchmark, 80 real photos x 7 instructions (one per category:
local, remove, add, texture, background, global, style), for evaluation only (no edited images).

Manual dir (the layout of the release):
    real_edit_instruct.json   {"<image file>": ["Local: <instruction>", "Remove: ...", ...], ...}
    Real-Edit/<image file>    the photos (JPEG or PNG); without a Real-Edit/ folder, the images are
                              looked up next to the JSON
Each instruction is "<Category>: <text>" (a leading "1." or "1)" and a "." or "-" instead of the
colon are accepted), or an object {"category": ..., "instruction": ...}.

Split "test" (TFDS orders examples by a hash of their id). Features: id ("<image file>:<position in its list>"),
image_name, original (uint8, the photo's own size), instruction, category (lower case).
"""

from __future__ import annotations

import collections
import json
import os
import re

import tensorflow_datasets as tfds

from data_prep import manual_dir
from data_prep.manual_dir import SkipExample

CATEGORIES = ("local", "remove", "add", "texture", "background", "global", "style")
INSTRUCTIONS_PER_IMAGE = len(CATEGORIES)
INSTRUCTION_FILE = "real_edit_instruct.json"
IMAGE_FOLDER = "Real-Edit"
_LINE = re.compile(
    r"^\s*(?:\d+\s*[.)]\s*)?(?P<category>[A-Za-z]+)\s*[:.\-]\s*(?P<instruction>\S.*?)\s*$", re.S
)


def parse_instruction(entry) -> tuple[str, str]:
  """(category, instruction) of one entry of an image's list."""
  if isinstance(entry, dict):
    category, text = entry.get("category"), entry.get("instruction")
  elif isinstance(entry, str) and (match := _LINE.match(entry)):
    category, text = match["category"], match["instruction"]
  else:
    raise SkipExample(
        "bad_instruction", f'expected "<Category>: <instruction>", got {str(entry)[:80]!r}'
    )
  if not isinstance(category, str) or category.strip().lower() not in CATEGORIES:
    raise SkipExample(
        "bad_category", f"unknown category {category!r}; expected one of {CATEGORIES}"
    )
  if not isinstance(text, str) or not text.strip():
    raise SkipExample("bad_instruction", "the instruction text is empty")
  return category.strip().lower(), " ".join(text.split())


class Builder(manual_dir.ReportingBuilder):
  """DatasetBuilder for real_edit."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Put {INSTRUCTION_FILE} ({{"<image file>": ["Local: ...", ...]}}) in the manual dir and the photos '
      f"in its {IMAGE_FOLDER}/ folder."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "image_name": tfds.features.Text(),
            "original": manual_dir.image_feature(),
            "instruction": tfds.features.Text(),
            "category": tfds.features.Text(),
        }
    )
    return self.dataset_info_from_configs(features=features, supervised_keys=None)

  def _split_generators(self, dl_manager):
    return {"test": self._generate_examples(os.fspath(dl_manager.manual_dir))}

  def _generate_examples(self, root: str):
    path = os.path.join(root, INSTRUCTION_FILE)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"real_edit: {path} is missing.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    with open(path, encoding="utf-8") as handle:
      entries = json.load(handle)  # a broken instruction file is not one bad item: fail the build
    if not isinstance(entries, dict):
      raise ValueError(
          f'{path}: expected {{"<image file>": [instructions]}}, got {type(entries).__name__}'
      )
    folder = os.path.join(root, IMAGE_FOLDER)
    folder = folder if os.path.isdir(folder) else root
    per_category = collections.Counter()
    for image_name, instructions in entries.items():
      if not isinstance(instructions, list) or not instructions:
        self.report.skip(
            "test", image_name, SkipExample("bad_entry", "expected a non-empty instruction list")
        )
        continue
      if len(instructions) != INSTRUCTIONS_PER_IMAGE:
        self.report.note(f"images_without_{INSTRUCTIONS_PER_IMAGE}_instructions")
      try:  # one image problem makes all its instructions unusable
        image = manual_dir.image_bytes(
            os.path.join(folder, manual_dir.check_key(image_name)), "photo"
        )
      except SkipExample as error:
        for position in range(len(instructions)):
          self.report.skip("test", f"{image_name}:{position}", error)
        continue
      for position, entry in enumerate(instructions):
        example_id = f"{image_name}:{position}"
        example = self._checked(
            "test", example_id, lambda: self._example(example_id, image_name, image, entry)
        )
        if example is not None:
          per_category[example["category"]] += 1
          yield example_id, example
    for category in CATEGORIES:
      self.report.notes[f"examples_{category}"] = per_category[category]
    self._require_examples("test")

  @staticmethod
  def _example(example_id: str, image_name: str, image: bytes, entry) -> dict:
    category, instruction = parse_instruction(entry)
    return {
        "id": example_id,
        "image_name": image_name,
        "original": image,
        "instruction": instruction,
        "category": category,
    }
