"""The release-size SmartEdit a training config asks for (`model.smartedit.size` '7b' or '13b'),
loaded from a SmartEdit folder, and its export.

Training starts from `model.pretrained`: a folder in the release's layout (`LLM-<step>/`,
`embeddings_qformer/`, `modulate-<step>/`, `unet-<step>/`) or an editor folder (the same plus
`smartedit.json`, what `mre.train` exports). The folders it needs beside it come from
`smartedit.json` or from `model.smartedit.clip` / `ip2p` / `llm_tokenizer` / `base_llm` (which
override it): the CLIP vision tower, the InstructPix2Pix or SD 1.5 diffusers folder (VAE, CLIP
text encoder for the null context and the reward texts, its tokenizer, the scheduler), the LLaMA
tokenizer and, optionally, LLaVA/Vicuna for the original vocabulary rows. The network sizes are
the folder's (the LLM's width says 7B or 13B; an editor folder's `smartedit.json` may name others,
as the tests' tiny ones do). With `model.reward.enabled` the U-Net becomes a `RewardUNet` with
new reward modules, every SmartEdit weight kept: the paper's SmartEdit row is a fine-tune of a
trained SmartEdit, as its InstructPix2Pix row is of a trained InstructPix2Pix. A folder with a
reward U-Net already trains further only with the same reward form in `model.reward`. One host
only (over its devices): several processes are refused.

Not built: the release's own start of SmartEdit training (LLaVA + an InstructDiffusion U-Net +
a Q-Former from its alignment stage, the BIM new).
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import jax
from absl import logging

from mre import model_setup
from mre.model_io import smartedit_folder as sf
from mre.models.reward_unet import RewardUNet, reward_unet_from_stage1
from mre.smartedit_editor import SmartEditPipeline

FOLDER_KEYS = ("clip", "ip2p", "llm_tokenizer", "base_llm")


@dataclasses.dataclass
class ReleaseSmartEdit:
  """The loaded editor and the folders it was loaded with (absolute)."""

  pipe: SmartEditPipeline
  folders: dict


def folder_overrides(config) -> dict:
  """`model.smartedit`'s folders that are set (they override the folder's smartedit.json)."""
  s = config.model.smartedit
  return {k: s.get(k) or None for k in FOLDER_KEYS}


def _reward_form(reward) -> dict:
  """A reward config's fields that shape the model (not its training dropout rates)."""
  rates = ("attn_dropout", "dropout_prob", "text_dropout_prob")
  return {k: v for k, v in dataclasses.asdict(reward).items() if k not in rates}


def build_release(config) -> ReleaseSmartEdit:
  """The SmartEdit in `model.pretrained` with its folders, compute in `model.dtype` (parameters
  float32); with `model.reward.enabled`, its U-Net made a `RewardUNet` (seeded by `config.seed`)."""
  folder = config.model.pretrained
  overrides = folder_overrides(config)
  options = sf.editor_options(folder, overrides)  # every missing folder or file named at once
  dtype = model_setup.dtype_of(config.model.dtype)
  # Read onto the host: the trainer then places each weight sharded over the mesh, so no
  # accelerator ever holds the whole 7B or 13B model.
  on_host = jax.default_device(jax.local_devices(backend="cpu")[0])
  with on_host:
    pipe = sf.load_editor_folder(folder, overrides, dtype=dtype)
  reward = model_setup.reward_config(config)
  unet = pipe.model.unet
  if isinstance(unet, RewardUNet):
    if reward is None:
      raise ValueError(
          f"{folder} holds a reward-conditioned SmartEdit; set model.reward.enabled=True to "
          "train it further"
      )
    have, want = _reward_form(unet.reward_config), _reward_form(reward)
    if have != want:  # the data's text slots and the null reward follow the config
      diff = ", ".join(
          f"{k} {have[k]!r} there, {want[k]!r} here" for k in have if have[k] != want[k]
      )
      raise ValueError(f"{folder}'s reward U-Net differs from model.reward in {diff}")
  elif reward is not None:
    with on_host:
      pipe.model.unet = reward_unet_from_stage1(unet, reward, seed=config.seed, dtype=dtype)
  folders = {k: options[k] for k in FOLDER_KEYS if options.get(k)}
  cfg = pipe.model.config
  logging.info(
      "SmartEdit from %s: LLM width %d, %d layers; folders %s",
      folder,
      cfg.llm.hidden_size,
      cfg.llm.num_hidden_layers,
      folders,
  )
  return ReleaseSmartEdit(pipe, folders)


def export_release(editor: ReleaseSmartEdit, folder: str, step: int) -> str:
  """An editor folder: the release layout at `step` and smartedit.json naming the folders the
  model was loaded with (absolute paths), its sizes and reward form."""
  if os.path.isdir(folder):  # a rerun's export replaces the old one whole (no stale steps)
    shutil.rmtree(folder)
  model = editor.pipe.model
  sf.save_smartedit_folder(model, folder, step)
  sf.write_editor_json(folder, model=model, step=step, **editor.folders)
  return folder


__all__ = ["FOLDER_KEYS", "ReleaseSmartEdit", "build_release", "export_release", "folder_overrides"]
