"""What a benchmark runs: one network configuration, its batch and resolution, and the rows to time.

A `Preset` holds the diffusers-style config dicts of the U-Net, the text encoder and the VAE (None:
pixel space), so that the same dict builds our Flax network and diffusers' PyTorch one. Presets:

  toy             the network and batch of `configs/ip2p.py:toy` (24 px pixel-space U-Net,
                  batch 32, float32), training and editing
  sd15-256-train  SD 1.5 shapes (InstructPix2Pix's 8-channel U-Net, VAE, CLIP ViT-L text) at
                  256 px, bfloat16 compute: training
  sd15-512-edit   the same networks at 512 px: editing (30 Euler-ancestral steps, three branches)

and `from_config(config)` for any training config. Weights are random (nothing is downloaded) except
for a config whose `model.pretrained` folder is loaded by the trainer's own `model_setup`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

TRAIN_ROWS = ("unet_train", "trainer")
EDIT_ROWS = ("unet_forward", "edit", "edit_batch")
# One 3x3 convolution of the U-Net's first level: where XLA:CPU and oneDNN differ most.
CONV_ROWS = ("conv_forward", "conv_input_grad", "conv_weight_grad")
ROWS = TRAIN_ROWS + EDIT_ROWS + CONV_ROWS + ("input_pipeline",)

# diffusers' UNet2DConditionModel config of SD 1.5, with InstructPix2Pix's 8 input channels.
SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 64,
    "in_channels": 8,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}
# CLIP ViT-L/14's text tower; the vocabulary size is the real one, the ids come from a word
# tokenizer (no download), so `eos_token_id` is set to that tokenizer's at build time.
SD15_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}


@dataclasses.dataclass(frozen=True)
class Preset:
  """One benchmark: the networks (config dicts), shapes, precision and rows.

  config: the training config the trainer row runs (optimizer, dropout, EMA, schedule); for a
    config preset also the source of the networks (`models`).
  models: `model_setup.Models` built from `config` (the toy editor, or a pretrained folder): the
    trainer row uses exactly what `mre.train` would; None: networks from the dicts.
  """

  name: str
  unet: dict
  text: dict
  vae: Optional[dict]  # None: pixel space (the toy editors)
  resolution: int
  batch: int  # training batch (one device, no accumulation)
  edit_batch: int  # the batch of the throughput edit
  edit_steps: int
  dtype: str  # computation ("float32" or "bfloat16"); parameters stay float32 in training
  remat: tuple
  train_text_encoder: bool
  tokens: int  # token ids per text (77 for CLIP; the toy tokenizer's max_tokens)
  scheduler: dict
  rows: tuple
  config: Any = None
  models: Any = None
  words: tuple = ()  # vocabulary of the word tokenizer the editor tokenises with
  tokenizer: Any = None  # a transformers CLIPTokenizer (`with_tokenizer`)

  @property
  def latent_size(self) -> int:
    return self.resolution // (2 ** (len(self.vae["block_out_channels"]) - 1) if self.vae else 1)

  @property
  def latent_channels(self) -> int:
    return self.vae["latent_channels"] if self.vae else self.unet["out_channels"]


def synthetic_words(n: int = 86) -> tuple:
  """A closed vocabulary of `n` made-up words (the toy world's has 86)."""
  return tuple(f"w{i}" for i in range(n))


def sd15_config(batch: int, dtype: str, remat=()):
  """The stage-1 recipe's training config at the benchmark's batch (one device, no accumulation)."""
  from configs import ip2p  # pylint: disable=import-outside-toplevel

  c = ip2p.get_config()
  c.model.pretrained = ""
  c.model.dtype = dtype
  c.model.remat = tuple(remat)
  c.train.batch_per_device = batch
  c.train.grad_accum = 1
  return c


def sd15(name: str, *, resolution, batch, edit_batch, edit_steps, rows, dtype="bfloat16", remat=()):
  from mre.model_setup import SCRATCH_SCHEDULER  # pylint: disable=import-outside-toplevel

  return Preset(
      name=name,
      unet=dict(SD15_UNET, sample_size=resolution // 8),
      text=dict(SD15_TEXT),
      vae=dict(SD15_VAE, sample_size=resolution),
      resolution=resolution,
      batch=batch,
      edit_batch=edit_batch,
      edit_steps=edit_steps,
      dtype=dtype,
      remat=tuple(remat),
      train_text_encoder=False,
      tokens=77,
      scheduler=dict(SCRATCH_SCHEDULER),
      rows=tuple(rows),
      config=sd15_config(batch, dtype, remat),
      words=synthetic_words(),
  )


def _vocabulary(config) -> tuple:
  """The dataset's closed vocabulary when its module registers one (the toy world), else made up."""
  from mre.data import registry  # pylint: disable=import-outside-toplevel

  try:
    hooks = registry.hooks_for(config.data.name, modules=tuple(config.data.modules))
  except ImportError:
    hooks = None
  if hooks is not None and hooks.vocabulary is not None:
    return tuple(hooks.vocabulary())
  return synthetic_words()


def from_config(
    config, tokenizer_dir: str, name: str = "config", rows=TRAIN_ROWS + EDIT_ROWS, edit_steps=None
):
  """A preset of a training config: its networks built by the trainer's `model_setup`, its batch
  per device (times accumulation: the bench times one step without accumulation)."""
  from mre import model_setup  # pylint: disable=import-outside-toplevel

  stage1 = config.get("stage1")
  if stage1 is not None and not os.path.isdir(config.model.pretrained):
    # The toy reward recipe starts from stage 1's export; timing needs no trained weights.
    config = config.copy_and_resolve_references()
    config.model.pretrained = ""
  words = () if config.model.pretrained else _vocabulary(config)
  models = model_setup.build_models(config, vocab_words=list(words), tokenizer_dir=tokenizer_dir)
  pipe = models.pipe
  vae = None if type(pipe.vae).__name__ == "PixelSpace" else dict(pipe.vae.config.raw)
  unet = dict(pipe.unet.config.raw)
  if unet.get("addition_embed_type") is None:
    unet.pop("addition_embed_type", None)
  config = config.copy_and_resolve_references()
  batch = config.train.batch_per_device * config.train.grad_accum
  with config.unlocked():
    config.train.batch_per_device, config.train.grad_accum = batch, 1
  return Preset(
      name=name,
      unet=unet,
      text=dict(pipe.text_encoder.config.raw),
      vae=vae,
      resolution=config.data.resolution,
      batch=batch,
      edit_batch=min(batch, 8),
      edit_steps=edit_steps or config.train.val_steps,
      dtype=config.model.dtype,
      remat=tuple(config.model.remat),
      train_text_encoder=config.model.train_text_encoder,
      tokens=pipe.tokenizer.model_max_length,
      scheduler=dict(pipe.scheduler_config),
      rows=tuple(rows),
      config=config,
      models=models,
      words=tuple(words) or synthetic_words(),
      tokenizer=pipe.tokenizer,
  )


PRESETS = ("toy", "sd15-256-train", "sd15-512-edit")


def with_tokenizer(p: Preset, folder: str) -> Preset:
  """A preset with a tokenizer: the config's own, or a word tokenizer over `p.words` written to
  `folder` (CLIP's real vocabulary is not downloaded); the text encoder pools at its EOS id."""
  from mre.model_io.diffusers_folder import load_tokenizer  # pylint: disable=import-outside-toplevel
  from mre.model_io.word_tokenizer import (  # pylint: disable=import-outside-toplevel
      write_word_tokenizer,
  )

  tok = p.tokenizer
  if tok is None:
    tok = load_tokenizer(write_word_tokenizer(folder, p.words, max_length=p.tokens))
  text = {"eos_token_id": tok.eos_token_id, **p.text}
  text["vocab_size"] = max(text["vocab_size"], len(tok))
  return dataclasses.replace(p, tokenizer=tok, text=text)


def preset(name: str, tokenizer_dir: str) -> Preset:
  """A named preset (PRESETS)."""
  if name == "toy":
    from configs import ip2p  # pylint: disable=import-outside-toplevel

    rows = ("input_pipeline",) + TRAIN_ROWS + EDIT_ROWS + CONV_ROWS
    config = ip2p.get_config("toy")
    # The recipe's per-pixel output head is ours, not diffusers': both sides time the same
    # U-Net with its 3 x 3 conv_out (`--config=configs/ip2p.py:toy`
    # times the recipe's network, head included, on the JAX side).
    config.model.scratch.pixel_head = 0
    config.model.scratch.pixel_head_only = False
    config.model.scratch.pixel_head_input_scale = 1.0
    config.model.scratch.pixel_head_fourier = 0
    config.model.scratch.pixel_head_gate = False
    return from_config(config, tokenizer_dir, name="toy", rows=rows, edit_steps=20)
  if name == "sd15-256-train":
    return sd15(name, resolution=256, batch=8, edit_batch=8, edit_steps=30, rows=TRAIN_ROWS)
  if name == "sd15-512-edit":
    return sd15(name, resolution=512, batch=1, edit_batch=8, edit_steps=30, rows=EDIT_ROWS)
  raise ValueError(f"unknown preset {name!r}; choose from {PRESETS} or pass --config")


def override(p: Preset, **changes) -> Preset:
  """The preset with fields replaced (batch, edit_batch, edit_steps, rows)."""
  return dataclasses.replace(p, **changes)
