"""The input of reward annotation: editing triplets (`Item`) from a TFDS split or a JSONL file.

Input entries that are not items come as `BadInput` (skipped, counted and listed by the run);
images are read when an item is annotated (`load_image`, in a worker thread). The run is
`data_prep.annotation`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, Iterator, Optional

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class Item:
  """One triplet. Images: uint8 [H, W, 3] arrays, PIL images, encoded bytes, or file paths
  (read when the item is annotated, in a worker thread)."""

  id: str
  instruction: str
  original: Any
  edited: Any


@dataclasses.dataclass(frozen=True)
class FeatureNames:
  """Which record fields of a TFDS dataset hold what (defaults: toy_edit's features)."""

  id: Optional[str] = "id"  # None: the record's index in the split
  instruction: str = "instruction"
  original: str = "original"
  edited: str = "edited"


class TfdsItems:
  """The items of a TFDS split, read through `tfds.data_source` (random access, no TensorFlow).
  Re-iterable; records are read one at a time."""

  def __init__(
      self,
      name: str,
      split: str = "train",
      data_dir: Optional[str] = None,
      features: FeatureNames = FeatureNames(),
  ):
    import tensorflow_datasets as tfds  # imported here: the JSONL path does not need it

    self.features = features
    self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)

  def __len__(self) -> int:
    return len(self._source)

  def __iter__(self) -> Iterator[Item]:
    f = self.features
    for index in range(len(self._source)):
      record = self._source[index]
      item_id = str(index) if f.id is None else _text(record[f.id])
      yield Item(item_id, _text(record[f.instruction]), record[f.original], record[f.edited])


@dataclasses.dataclass(frozen=True)
class BadInput:
  """An input entry that is not an item: skipped, counted and listed, never annotated."""

  where: str  # "<file>:<line number>"
  reason: str


class JsonlItems:
  """Items from a JSONL of {"id", "instruction", "original", "edited"} lines (all strings); image
  paths are relative to the JSONL's folder (or absolute). Re-iterable. A line that is not such an
  object comes as a BadInput naming its line; blank lines are ignored."""

  FIELDS = ("id", "instruction", "original", "edited")

  def __init__(self, path: str):
    self.path = path
    self._root = os.path.dirname(os.path.abspath(path))

  def __len__(self) -> int:
    with open(self.path, "rb") as handle:
      return sum(1 for line in handle if line.strip())

  def __iter__(self) -> Iterator[Item | BadInput]:
    with open(self.path, "rb") as handle:  # bytes: one line of bad UTF-8 must not end the file
      for number, line in enumerate(handle, start=1):
        if not line.strip():
          continue
        try:
          item_id, instruction, original, edited = self._fields(line)
        except ValueError as error:
          yield BadInput(f"{self.path}:{number}", str(error))
          continue
        yield Item(
            item_id,
            instruction,
            os.path.join(self._root, original),
            os.path.join(self._root, edited),
        )

  def _fields(self, line: bytes) -> list[str]:
    try:
      entry = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
      raise ValueError("the line is not UTF-8") from None
    except RecursionError:
      raise ValueError("the line is not JSON (nested too deeply)") from None
    except ValueError as error:
      raise ValueError(f"the line is not JSON ({error})") from None
    if not isinstance(entry, dict):
      raise ValueError(
          f'expected an object {{"id", "instruction", "original", "edited"}}, '
          f"got a {type(entry).__name__}"
      )
    missing = [key for key in self.FIELDS if key not in entry]
    if missing:
      raise ValueError(f"missing {', '.join(missing)}")
    wrong = [
        f"{key} is a {type(entry[key]).__name__}"
        for key in self.FIELDS
        if not isinstance(entry[key], str)
    ]
    if wrong:
      raise ValueError(f"id, instruction, original and edited must be strings: {', '.join(wrong)}")
    if not entry["id"].strip():
      raise ValueError("the id is empty")
    return [entry[key] for key in self.FIELDS]


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_image(image, what: str) -> Any:
  """A path or encoded bytes -> uint8 RGB array (PIL decodes JPEG and PNG alike); arrays and PIL
  images pass."""
  if isinstance(image, (str, os.PathLike)):
    with open(image, "rb") as handle:
      image = handle.read()
  if isinstance(image, (bytes, bytearray)):
    try:
      with Image.open(io.BytesIO(image)) as decoded:
        return np.asarray(decoded.convert("RGB"))
    except Exception as error:  # PIL raises many kinds for broken files
      raise ValueError(f"the {what} image is not readable ({error})") from None
  return image
