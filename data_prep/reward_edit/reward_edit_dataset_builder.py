"""`reward_edit`: RewardEdit20K, InstructPix2Pix triplets with multi-perspective rewards.

Manual dir: an InstructPix2Pix CLIP-filtered folder (see data_prep.manual_dir) holding the reward
file as well, one of
    RewardEdit_20K.json / rewards.json   the released layout {"<key>": [{"Score", "Negative Prompt"} x3]}
    rewards.jsonl                        our annotator's output (failed records are skipped)

Which pair of a key: a reward id "<key>:<seed>" (what our annotator writes for
instruct_pix2pix/all_seeds) names the seed; a plain "<key>" (the released file) takes the first
seed listed for the key in seeds.json, or, without seeds.json, the smallest seed whose two images
are in the folder. Keys with several seeds are counted in the report's notes.

One example per usable reward (split "train"; TFDS orders examples by a hash of their id). Features: id (the
reward id), key, seed, original, edited (uint8 images of any size), instruction, reward_scores
float32 [3] and reward_texts [3] (order following, preserving, quality).
"""

from __future__ import annotations

import os
import re

import numpy as np
import tensorflow_datasets as tfds

from data_prep import manual_dir, rewards
from data_prep.manual_dir import SkipExample

REWARD_FILES = ("RewardEdit_20K.json", "rewards.json", "rewards.jsonl")
_SEEDED_ID = re.compile(r"^(?P<key>.+):(?P<seed>\d+)$")


def reward_file(root: str) -> str:
  found = [name for name in REWARD_FILES if os.path.isfile(os.path.join(root, name))]
  if len(found) != 1:
    raise FileNotFoundError(
        f"reward_edit: the manual dir {root} must hold exactly one of {REWARD_FILES}, "
        f"found {found or 'none'}"
    )
  return os.path.join(root, found[0])


class Builder(manual_dir.ReportingBuilder):
  """DatasetBuilder for reward_edit."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the InstructPix2Pix CLIP-filtered folders (<key>/prompt.json, <key>/<seed>_0.jpg, <key>/<seed>_1.jpg, "
      f"optionally seeds.json) in the manual dir, with one reward file: {', '.join(REWARD_FILES)}."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict(
        {
            **manual_dir.triplet_features(),
            "reward_scores": tfds.features.Tensor(shape=(3,), dtype=np.float32),
            "reward_texts": tfds.features.Sequence(tfds.features.Text(), length=3),
        }
    )
    return self.dataset_info_from_configs(features=features, supervised_keys=None)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(os.fspath(dl_manager.manual_dir))}

  def _generate_examples(self, root: str):
    path = reward_file(root)
    found, problems = rewards.load_rewards(path)
    listed = manual_dir.read_seeds(root)
    seeds_of = None if listed is None else {}  # key -> seeds listed in seeds.json
    for entry in listed or []:
      try:
        key, seeds = manual_dir.seed_entry(entry)
      except SkipExample:
        continue  # instruct_pix2pix reports bad seeds.json entries; here they just give no seed
      seeds_of.setdefault(key, seeds)
    for reward_id, error in problems.items():
      self.report.skip("train", reward_id, SkipExample(error.kind, str(error)))
    for reward_id, reward in found.items():
      example = self._checked(
          "train", reward_id, lambda: self._example(root, reward_id, reward, seeds_of)
      )
      if example is not None:
        yield reward_id, example
    self._require_examples("train")

  def _example(self, root: str, reward_id: str, reward: rewards.Reward, seeds_of) -> dict:
    match = _SEEDED_ID.match(reward_id)
    key = match["key"] if match else reward_id
    folder = manual_dir.key_folder(root, key)
    if match:
      seed = int(match["seed"])
    elif seeds_of is not None:
      if key not in seeds_of:
        raise SkipExample("no_seed", f"seeds.json lists no seed for {key!r}")
      seed = seeds_of[key][0]
      if len(seeds_of[key]) > 1:
        self.report.note("several_seeds_took_first_listed")
    else:
      seeds = manual_dir.folder_seeds(folder)
      if not seeds:
        raise SkipExample("missing_image", f"{folder} has no <seed>_0.jpg / <seed>_1.jpg pair")
      if len(seeds) > 1:
        self.report.note("several_seeds_took_smallest")
      seed = seeds[0]
    original, edited = manual_dir.pair(folder, seed)
    return {
        "id": reward_id,
        "key": key,
        "seed": seed,
        "original": original,
        "edited": edited,
        "instruction": manual_dir.instruction(folder),
        "reward_scores": np.array(reward.scores, np.float32),
        "reward_texts": list(reward.texts),
    }
