"""The `real_edit` TFDS dataset: the Real-Edit benchmark (80 photos x 7 instructions).

    from data_prep import real_edit
    builder = real_edit.build("/data/real-edit", "/data/tfds")
    source = tfds.data_source("real_edit", split="test", data_dir="/data/tfds")

The manual dir layout is in real_edit_dataset_builder's docstring.
"""

from __future__ import annotations

from data_prep import manual_dir
from data_prep.real_edit import real_edit_dataset_builder
from data_prep.real_edit.real_edit_dataset_builder import CATEGORIES, Builder, parse_instruction

NAME = "real_edit"


def build(manual_dir_path: str, data_dir: str) -> Builder:
  return manual_dir.build(Builder, manual_dir_path, data_dir)


__all__ = [
    "NAME",
    "CATEGORIES",
    "Builder",
    "build",
    "parse_instruction",
    "real_edit_dataset_builder",
]
