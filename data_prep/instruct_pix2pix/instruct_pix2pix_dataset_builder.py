"""`instruct_pix2pix`: the stage-1 training triplets of the InstructPix2Pix CLIP-filtered release.

Manual dir: the release's folder (see data_prep.manual_dir): seeds.json, and per key
prompt.json, <seed>_0.jpg (original) and <seed>_1.jpg (edited).

Configs:
  all_seeds  one example per (key, seed) listed in seeds.json, id "<key>:<seed>" (InstructPix2Pix
             draws one of a key's seeds at random per step; here each pair is one example)
  one_seed   one example per key, the first seed listed, id "<key>" (the pair reward_edit uses
             for a released reward of that key: annotate this config to extend RewardEdit20K)

Split "train" (TFDS orders examples by a hash of their id). Features: id, key, seed, original,
edited (uint8 images of any size), instruction.
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow_datasets as tfds

from data_prep import manual_dir
from data_prep.manual_dir import SkipExample


@dataclasses.dataclass
class InstructPix2PixConfig(tfds.core.BuilderConfig):
  all_seeds: bool = True


CONFIGS = (
    InstructPix2PixConfig(
        name="all_seeds", description="Every (key, seed) pair listed in seeds.json."
    ),
    InstructPix2PixConfig(
        name="one_seed", all_seeds=False, description="The first listed seed of each key."
    ),
)


class Builder(manual_dir.ReportingBuilder):
  """DatasetBuilder for instruct_pix2pix."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = list(CONFIGS)
  DEFAULT_BUILDER_CONFIG_NAME = CONFIGS[0].name
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the InstructPix2Pix CLIP-filtered release in the manual dir: seeds.json and the folders "
      "<key>/prompt.json, <key>/<seed>_0.jpg, <key>/<seed>_1.jpg."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict(manual_dir.triplet_features())
    return self.dataset_info_from_configs(features=features, supervised_keys=None)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(os.fspath(dl_manager.manual_dir))}

  def _generate_examples(self, root: str):
    entries = manual_dir.read_seeds(root)
    if entries is None:
      raise FileNotFoundError(
          f"instruct_pix2pix: {root}/seeds.json is missing.\n"
          f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
      )
    seen = set()
    for number, entry in enumerate(entries):
      label = (
          str(entry[0])
          if isinstance(entry, (list, tuple)) and entry
          else f"seeds.json entry {number}"
      )
      try:
        key, seeds = manual_dir.seed_entry(entry)
        if key in seen:
          raise SkipExample("duplicate_key", f"seeds.json lists {key!r} more than once")
        seen.add(key)
        folder = manual_dir.key_folder(root, key)
        instruction = manual_dir.instruction(folder)
      except SkipExample as error:  # the whole key is unusable: count each pair it would give
        for _ in range(self._pairs_in(entry)):
          self.report.skip("train", label, error)
        continue
      for seed in seeds if self.builder_config.all_seeds else seeds[:1]:
        example_id = f"{key}:{seed}" if self.builder_config.all_seeds else key
        example = self._checked(
            "train", example_id, lambda: self._example(example_id, key, seed, folder, instruction)
        )
        if example is not None:
          yield example_id, example
    self._require_examples("train")

  def _pairs_in(self, entry) -> int:
    """How many examples an entry would give (so skipped counts are in examples)."""
    if not self.builder_config.all_seeds:
      return 1
    seeds = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
    return max(1, len(seeds)) if isinstance(seeds, (list, tuple)) else 1

  @staticmethod
  def _example(example_id: str, key: str, seed: int, folder: str, instruction: str) -> dict:
    original, edited = manual_dir.pair(folder, seed)
    return {
        "id": example_id,
        "key": key,
        "seed": seed,
        "original": original,
        "edited": edited,
        "instruction": instruction,
    }
