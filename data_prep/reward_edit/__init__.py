"""The `reward_edit` TFDS dataset: RewardEdit20K (InstructPix2Pix triplets with rewards).

    from data_prep import reward_edit
    builder = reward_edit.build("/data/ip2p-clip-filtered", "/data/tfds")   # manual dir, data dir
    source = tfds.data_source("reward_edit", split="train", data_dir="/data/tfds")

The manual dir layout is in reward_edit_dataset_builder's docstring; what was skipped and why is
in `manual_dir.read_report(builder)` (build_report.json next to the dataset).
"""

from __future__ import annotations

from typing import Optional

from data_prep import manual_dir
from data_prep.reward_edit import reward_edit_dataset_builder
from data_prep.reward_edit.reward_edit_dataset_builder import REWARD_FILES, Builder

NAME = "reward_edit"


def build(manual_dir_path: str, data_dir: str, config: Optional[str] = None) -> Builder:
  return manual_dir.build(Builder, manual_dir_path, data_dir, config)


__all__ = ["NAME", "REWARD_FILES", "Builder", "build", "reward_edit_dataset_builder"]
