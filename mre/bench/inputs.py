"""Random inputs of a preset's shapes, as numpy arrays (NHWC) that both frameworks are fed.

Timing does not depend on the values, but both sides see the same ones: PyTorch gets the arrays
transposed to NCHW (`nchw`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mre.bench.presets import Preset
from mre.models.reward_config import RewardConfig, RewardInputs
from mre.pipeline import tokenize


def nchw(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))


@dataclasses.dataclass
class Inputs:
  preset: Preset
  seed: int = 0

  def __post_init__(self):
    self.rng = np.random.default_rng(self.seed)
    self.empty_ids = tokenize(self.preset.tokenizer, [""])

  def _normal(self, *shape) -> np.ndarray:
    return self.rng.standard_normal(shape, np.float32)

  def _ids(self, *shape) -> np.ndarray:
    return self.rng.integers(0, len(self.preset.tokenizer), shape, dtype=np.int32)

  def unet_batch(self, b: int) -> dict:
    """The U-Net's training inputs: [noisy | image] latents, timesteps, context, and a target."""
    p, s = self.preset, self.preset.latent_size
    return {
        "sample": self._normal(b, s, s, p.unet["in_channels"]),
        "timesteps": self.rng.integers(0, 1000, (b,), dtype=np.int32),
        "context": self._normal(b, p.tokens, p.unet["cross_attention_dim"]),
        "target": self._normal(b, s, s, p.unet["out_channels"]),
    }

  def images(self, b: int) -> np.ndarray:
    r = self.preset.resolution
    return self.rng.uniform(-1.0, 1.0, (b, r, r, 3)).astype(np.float32)

  def trainer_batch(self, b: int, reward: RewardConfig | None) -> dict:
    """A batch as `mre.data.train_input.TrainIterator` yields it: [accum=1, b, ...]."""
    batch = {
        "original": self.images(b),
        "edited": self.images(b),
        "instruction_ids": self._ids(b, self.preset.tokens),
    }
    if reward is not None:
      batch["reward_scores"] = self.rng.uniform(0, 5, (b, 3)).astype(np.float32)
      batch["reward_ids"] = self._ids(b, reward.text_slots, self.preset.tokens)
    return {k: v[None] for k, v in batch.items()}

  def edit_unet_args(self, b: int) -> dict:
    """One guided step's inputs: scaled noisy latents, image latents, contexts, a timestep."""
    p, s = self.preset, self.preset.latent_size
    d = p.unet["cross_attention_dim"]
    return {
        "latents": self._normal(b, s, s, p.latent_channels),
        "image": self._normal(b, s, s, p.latent_channels),
        "text": self._normal(b, p.tokens, d),
        "uncond": self._normal(1, p.tokens, d),
        "t": np.float32(500.0),
    }

  def reward_inputs(self, b: int) -> RewardInputs:
    slots = 3 if self.preset.config.model.reward.form == "paper" else 1
    return RewardInputs(
        self.rng.uniform(0, 5, (b, 3)).astype(np.float32),
        self._normal(b, slots, self.preset.text["hidden_size"]),
    )

  def conv_arrays(self, b: int):
    """Input, kernel (HWIO) and output gradient of a 3x3 convolution of the first U-Net level."""
    s, c = self.preset.latent_size, self.preset.unet["block_out_channels"][0]
    w = self._normal(3, 3, c, c) / (3.0 * c**0.5)
    return self._normal(b, s, s, c), w, self._normal(b, s, s, c)

  def edit_images(self, b: int):
    """`b` images in [-1, 1] and instructions of four vocabulary words each."""
    words = list(self.preset.words) or ["edit"]
    instructions = [" ".join(self.rng.choice(words, 4)) for _ in range(b)]
    return self.images(b), instructions
