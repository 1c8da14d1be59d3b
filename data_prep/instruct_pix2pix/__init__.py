"""The `instruct_pix2pix` TFDS dataset: the stage-1 InstructPix2Pix CLIP-filtered triplets.

    from data_prep import instruct_pix2pix
    builder = instruct_pix2pix.build("/data/ip2p-clip-filtered", "/data/tfds")            # all_seeds
    source = tfds.data_source("instruct_pix2pix/all_seeds", split="train", data_dir="/data/tfds")

Configs and the manual dir layout are in instruct_pix2pix_dataset_builder's docstring.
"""

from __future__ import annotations

from typing import Optional

from data_prep import manual_dir
from data_prep.instruct_pix2pix import instruct_pix2pix_dataset_builder
from data_prep.instruct_pix2pix.instruct_pix2pix_dataset_builder import CONFIGS, Builder, InstructPix2PixConfig

NAME = "instruct_pix2pix"


def build(manual_dir_path: str, data_dir: str, config: Optional[str] = None) -> Builder:
  return manual_dir.build(Builder, manual_dir_path, data_dir, config)


__all__ = [
    "NAME",
    "CONFIGS",
    "Builder",
    "InstructPix2PixConfig",
    "build",
    "instruct_pix2pix_dataset_builder",
]
