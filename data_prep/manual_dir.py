"""What the datasets built from a manual dir share: safe keys, checked images, the build report,
and the InstructPix2Pix folder layout.

A bad input (a missing or corrupt image, an unusable reward, an unsafe key, ...) never stops a
build and is never included silently: the builder skips it, counts it under a reason in the build
report (`build_report.json` next to the dataset's files, and the log), and goes on.

InstructPix2Pix layout (the CLIP-filtered release):
    <root>/seeds.json            [[key, [seed, ...]], ...]
    <root>/<key>/prompt.json     {"input": ..., "edit": <the instruction>, "output": ...}
    <root>/<key>/<seed>_0.jpg    the original image of pair <seed>
    <root>/<key>/<seed>_1.jpg    the edited image of pair <seed>
Pairs are always picked by their seed's file names, never by directory listing order.
"""

from __future__ import annotations

import collections
import io
import json
import os
import re
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

REPORT_NAME = "build_report.json"
_EXAMPLES_PER_REASON = 20  # keys listed per reason in the report (all are counted)


class SkipExample(Exception):
  """This example is unusable; `kind` is the report's reason (e.g. corrupt_image)."""

  def __init__(self, kind: str, detail: str):
    super().__init__(f"{kind}: {detail}")
    self.kind, self.detail = kind, detail


class BuildReport:
  """Kept and skipped counts per split, skipped ones by reason with a few keys and details each,
  and notes (things done that are worth knowing, like a seed chosen among several)."""

  def __init__(self, dataset: str, manual_dir: str):
    self.dataset, self.manual_dir = dataset, manual_dir
    self.kept = collections.Counter()
    self.skipped = collections.defaultdict(collections.Counter)
    self.notes = collections.Counter()
    self._examples = collections.defaultdict(list)

  def keep(self, split: str) -> None:
    self.kept[split] += 1

  def skip(self, split: str, key: str, error: SkipExample) -> None:
    self.skipped[split][error.kind] += 1
    if len(self._examples[error.kind]) < _EXAMPLES_PER_REASON:
      self._examples[error.kind].append(
          {"split": split, "key": str(key)[:200], "detail": error.detail[:300]}
      )

  def note(self, kind: str) -> None:
    self.notes[kind] += 1

  def as_dict(self) -> dict:
    return {
        "dataset": self.dataset,
        "manual_dir": self.manual_dir,
        "kept": dict(self.kept),
        "skipped": {split: dict(reasons) for split, reasons in self.skipped.items()},
        "skipped_total": sum(sum(r.values()) for r in self.skipped.values()),
        "notes": dict(self.notes),
        "skipped_examples": dict(self._examples),
    }

  def write(self, directory: str) -> str:
    path = os.path.join(directory, REPORT_NAME)
    with open(path, "w", encoding="utf-8") as handle:
      json.dump(self.as_dict(), handle, indent=1, ensure_ascii=False)
    return path

  def log(self) -> None:
    report = self.as_dict()
    logging.info("%s: kept %s from %s", self.dataset, report["kept"], self.manual_dir)
    for split, reasons in report["skipped"].items():
      logging.warning(
          "%s/%s: skipped %d bad input(s): %s (details in %s)",
          self.dataset,
          split,
          sum(reasons.values()),
          reasons,
          REPORT_NAME,
      )
    if report["notes"]:
      logging.info("%s: notes %s", self.dataset, report["notes"])


class ReportingBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A GeneratorBasedBuilder that keeps a BuildReport and writes it next to the dataset."""

  def _download_and_prepare(self, dl_manager, download_config):
    # TFDS itself refuses a missing or empty manual dir, quoting MANUAL_DOWNLOAD_INSTRUCTIONS.
    self.report = BuildReport(self.name, os.fspath(dl_manager.manual_dir))
    super()._download_and_prepare(dl_manager, download_config)
    # self.data_dir is still the temporary folder that becomes the dataset's folder.
    self.report.write(os.fspath(self.data_dir))
    self.report.log()

  def _checked(self, split: str, key: str, make):
    """make() -> example, or None after recording the SkipExample it raised."""
    try:
      example = make()
    except SkipExample as error:
      self.report.skip(split, key, error)
      return None
    self.report.keep(split)
    return example

  def _require_examples(self, split: str) -> None:
    if not self.report.kept[split]:
      raise ValueError(
          f"{self.name}: no usable example for split {split!r} in {self.report.manual_dir}; "
          f"skipped: {dict(self.report.skipped[split])}"
      )


def image_feature() -> tfds.features.Image:
  # JPEG, as the sources are; stored bytes always decode to uint8 RGB of any size.
  return tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")


def triplet_features() -> dict:
  """The features of an InstructPix2Pix-folder triplet, shared by instruct_pix2pix and reward_edit."""
  return {
      "id": tfds.features.Text(),
      "key": tfds.features.Text(),
      "seed": np.int64,
      "original": image_feature(),
      "edited": image_feature(),
      "instruction": tfds.features.Text(),
  }


# ---------------------------------------------------------------------------------------------
# Keys and files.


def check_key(key) -> str:
  """A key (a folder or file below the root) that cannot leave the root: relative, no '..',
  no empty or '.' parts, no backslash or NUL."""
  if not isinstance(key, str) or not key:
    raise SkipExample("unsafe_key", f"the key {key!r} is not a non-empty string")
  parts = key.split("/")
  if (
      key.startswith(("/", "~"))
      or os.path.isabs(key)
      or "\\" in key
      or "\0" in key
      or any(p in ("", ".", "..") for p in parts)
  ):
    raise SkipExample("unsafe_key", f"the key {key!r} is not a plain relative path")
  return key


def image_bytes(path: str, what: str = "image") -> bytes:
  """Encoded image bytes that decode to uint8 RGB: JPEG or PNG RGB files as they are, anything
  else PIL reads (grayscale, CMYK, RGBA, ...) converted to RGB and stored as PNG."""
  if not os.path.isfile(path):
    raise SkipExample("missing_image", f"the {what} {path} does not exist")
  with open(path, "rb") as handle:
    data = handle.read()
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # decodes everything: a truncated file fails here
      if image.format in ("JPEG", "PNG") and image.mode == "RGB":
        return data
      buffer = io.BytesIO()
      image.convert("RGB").save(buffer, format="PNG")
      return buffer.getvalue()
  except Exception as error:  # PIL raises many kinds for broken files
    reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(error))
    raise SkipExample(
        "corrupt_image", f"the {what} {path} is not a readable image ({reason})"
    ) from None


def read_json(path: str, what: str):
  try:
    with open(path, encoding="utf-8") as handle:
      return json.load(handle)
  except OSError as error:
    raise SkipExample(f"missing_{what}", f"cannot read {path} ({error.strerror})") from None
  except ValueError as error:
    raise SkipExample(f"bad_{what}", f"{path} is not valid JSON ({error})") from None


# ---------------------------------------------------------------------------------------------
# The InstructPix2Pix layout.


def key_folder(root: str, key: str) -> str:
  folder = os.path.join(root, check_key(key))
  if not os.path.isdir(folder):
    raise SkipExample("missing_folder", f"the sample folder {folder} does not exist")
  return folder


def instruction(folder: str) -> str:
  """The edit instruction of prompt.json ("edit"; when it is a list, its first entry)."""
  prompt = read_json(os.path.join(folder, "prompt.json"), "prompt")
  edit = prompt.get("edit") if isinstance(prompt, dict) else None
  if isinstance(edit, list):
    edit = next((e for e in edit if isinstance(e, str) and e.strip()), None)
  if not isinstance(edit, str) or not edit.strip():
    raise SkipExample("bad_prompt", f"{folder}/prompt.json has no non-empty 'edit' instruction")
  return " ".join(edit.split())


def folder_seeds(folder: str) -> list[int]:
  """The seeds with both images in the folder, in numeric order."""
  names = set(os.listdir(folder))
  seeds = {int(m[1]) for m in map(re.compile(r"^(\d+)_0\.jpg$").match, names) if m}
  return sorted(s for s in seeds if f"{s}_1.jpg" in names)


def pair(folder: str, seed: int) -> tuple[bytes, bytes]:
  """(original, edited) encoded images of one seed."""
  return (
      image_bytes(os.path.join(folder, f"{seed}_0.jpg"), "original image"),
      image_bytes(os.path.join(folder, f"{seed}_1.jpg"), "edited image"),
  )


def parse_seed(value) -> int:
  if (
      isinstance(value, bool)
      or not isinstance(value, (int, str))
      or not re.fullmatch(r"\d+", str(value))
  ):
    raise SkipExample("bad_entry", f"the seed {value!r} is not a non-negative integer")
  return int(value)


def read_seeds(root: str) -> Optional[list]:
  """The entries of <root>/seeds.json (each still to be checked with `seed_entry`), or None."""
  path = os.path.join(root, "seeds.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as handle:
    entries = json.load(handle)  # a broken seeds.json is not one bad item: fail the build
  if not isinstance(entries, list):
    raise ValueError(f"{path}: expected [[key, [seed, ...]], ...], got {type(entries).__name__}")
  return entries


def seed_entry(entry) -> tuple[str, list[int]]:
  """(key, seeds) of one seeds.json entry [key, [seed, ...]]."""
  if not (
      isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], (list, tuple))
  ):
    raise SkipExample(
        "bad_entry", f"a seeds.json entry is [key, [seed, ...]], got {str(entry)[:80]!r}"
    )
  key, seeds = entry
  seeds = list(dict.fromkeys(parse_seed(s) for s in seeds))  # a repeated seed is one pair
  if not seeds:
    raise SkipExample("bad_entry", f"the seeds.json entry of {key!r} lists no seed")
  return check_key(key), seeds


# ---------------------------------------------------------------------------------------------
# Building.


def build(builder_class, manual_dir: str, data_dir: str, config: Optional[str] = None):
  """Builds a dataset (array_record) from a manual dir unless it is built already; returns the
  builder. Its report: `read_report(builder)`."""
  kwargs = {"config": config} if config else {}
  builder = builder_class(data_dir=data_dir, file_format="array_record", **kwargs)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
  )
  return builder


def read_report(builder) -> dict:
  with open(os.path.join(os.fspath(builder.data_dir), REPORT_NAME), encoding="utf-8") as handle:
    return json.load(handle)
