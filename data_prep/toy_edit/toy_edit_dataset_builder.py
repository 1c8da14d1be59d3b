"""`toy_edit`: the toy world's instruction-editing dataset, in the shape of the paper's data.

train: InstructPix2Pix-like triples whose edited images carry sampled flaws, annotated by the toy
       judge (the RewardEdit20K role): three scores and three failure texts per triple, plus the
       flaws actually applied and the ideal edit (ground truth the real data never has).
test:  clean originals with one instruction of each category (the Real-Edit role: the evaluator
       judges model edits of these). Their `edited` image is the ideal edit, so their annotation
       is the perfect one and their flaws are "none".

Features of both splits: id, original, edited, ideal, instruction, category, reward_scores (3,),
reward_texts (3,), flaws {following, preserving, quality: {mode, severity}}.

Images are stored as PNG and read back as uint8 arrays; the file format is array_record (random
access through `tfds.data_source`, no TensorFlow needed). Generation is deterministic: example i
of a split comes from the seed (config.seed, split, i).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data_prep.toy import flaws, instructions, judge, scenes

_SPLIT_SEEDS = {"train": 1, "test": 2}


@dataclasses.dataclass
class ToyEditConfig(tfds.core.BuilderConfig):
  """Image size, sizes of the splits and the flaw mix of the training targets."""

  image_size: int = 32
  train_examples: int = 20_000
  test_scenes: int = 112  # x 5 categories: 560 test edits, as many as Real-Edit
  max_objects: int = 3
  flaw_mix: flaws.FlawMix = dataclasses.field(default_factory=flaws.FlawMix)
  seed: int = 0


CONFIGS = (
    ToyEditConfig(
        name="32px", description="32x32 scenes, 20k flawed training triples, 560 test edits."
    ),
    ToyEditConfig(
        name="24px",
        image_size=24,
        max_objects=2,
        description="24x24 scenes (the size the toy training budget affords), 20k / 560.",
    ),
    ToyEditConfig(
        name="tiny",
        image_size=16,
        train_examples=48,
        test_scenes=4,
        max_objects=2,
        description="16x16 scenes, 48 training triples, 20 test edits: for tests.",
    ),
)
DEFAULT_CONFIG = CONFIGS[0].name


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def _example(
    key: str, original: np.ndarray, sample: instructions.EditSample, target: flaws.FlawedTarget
) -> dict:
  judgement = judge.judge(sample.instruction, original, target.image)
  return {
      "id": key,
      "original": _png(original),
      "edited": _png(target.image),
      "ideal": _png(scenes.render(sample.edited_scene)),
      "instruction": sample.instruction,
      "category": sample.edit.category,
      "reward_scores": np.array(judgement.scores, np.float32),
      "reward_texts": list(judgement.failures),
      "flaws": {
          p: {"mode": f.mode if f else "none", "severity": np.float32(f.severity if f else 0.0)}
          for p, f in target.flaws.items()
      },
  }


def train_example(config: ToyEditConfig, index: int) -> dict:
  """Training triple `index`: a scene, an instruction, its flawed edit and the judge's annotation."""
  rng = np.random.default_rng([config.seed, _SPLIT_SEEDS["train"], index])
  scene = scenes.random_scene(rng, size=config.image_size, max_objects=config.max_objects)
  sample = instructions.sample_edit(rng, scene)
  target = flaws.make_flawed_target(rng, scene, sample, config.flaw_mix)
  return _example(f"train_{index:06d}", scenes.render(scene), sample, target)


def test_examples(config: ToyEditConfig, scene_index: int) -> list[dict]:
  """One clean scene with an instruction of every category (redrawn until all five fit)."""
  for attempt in range(100):
    rng = np.random.default_rng([config.seed, _SPLIT_SEEDS["test"], scene_index, attempt])
    scene = scenes.random_scene(rng, size=config.image_size, max_objects=min(2, config.max_objects))
    try:
      samples = [instructions.sample_edit(rng, scene, category=c) for c in instructions.CATEGORIES]
    except ValueError:  # e.g. no room to add, or no tone that visibly changes this scene
      continue
    original = scenes.render(scene)
    perfect = lambda s: flaws.FlawedTarget(
        scenes.render(s.edited_scene), dict.fromkeys(flaws.PERSPECTIVES)
    )
    return [
        _example(f"test_{scene_index:04d}_{s.edit.category}", original, s, perfect(s))
        for s in samples
    ]
  raise RuntimeError(f"no test scene fits all categories for scene {scene_index}")


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for toy_edit."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      # triples and annotations change (README, "The paper's claim in the toy world")
      "1.1.0": "A preserving flaw, also_edited (the instructed recolouring or removal lands on "
      "another object as well); annotations by toy judge version 2 (deterministic ties between "
      "names; an edit that also hits another object fails preserving).",
  }
  BUILDER_CONFIGS = list(CONFIGS)
  DEFAULT_BUILDER_CONFIG_NAME = DEFAULT_CONFIG

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    image = lambda: tfds.features.Image(shape=(size, size, 3), encoding_format="png")
    flaw = lambda: tfds.features.FeaturesDict(
        {"mode": tfds.features.Text(), "severity": np.float32}
    )
    features = tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "original": image(),
            "edited": image(),
            "ideal": image(),
            "instruction": tfds.features.Text(),
            "category": tfds.features.Text(),
            "reward_scores": tfds.features.Tensor(shape=(3,), dtype=np.float32),
            "reward_texts": tfds.features.Sequence(tfds.features.Text(), length=3),
            "flaws": tfds.features.FeaturesDict({p: flaw() for p in flaws.PERSPECTIVES}),
        }
    )
    return self.dataset_info_from_configs(features=features, supervised_keys=None)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the world is generated
    return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

  def _generate_examples(self, split: str):
    config = self.builder_config
    if split == "train":
      for index in range(config.train_examples):
        example = train_example(config, index)
        yield example["id"], example
    else:
      for scene_index in range(config.test_scenes):
        for example in test_examples(config, scene_index):
          yield example["id"], example
