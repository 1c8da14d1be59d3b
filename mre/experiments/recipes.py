"""The training configs of the toy replication: stage 1, and stage 2 with or without rewards.

Both stage-2 runs come from the same recipe (`configs/reward.py:toy`): (a) only switches the reward
off, so the two differ in nothing but the reward condition.
"""

from __future__ import annotations

import ast

from configs import common, ip2p, reward, smartedit

# The paper's ablations (and our reward guidance), as overrides of run (b).
ABLATIONS = {
    "scores_only": {"model.reward.use_texts": False},
    "texts_only": {"model.reward.use_scores": False},
    "latent_injection_only": {"model.reward.inject_unet": False},
    "unet_injection_only": {"model.reward.inject_latent": False},
    "reward_dropout": {"model.reward.dropout_prob": 0.1},
}


def set_field(config, key: str, value):
  """config["a.b.c"] = value for a dotted key (the config stays locked: typos raise)."""
  node = config
  *path, leaf = key.split(".")
  for part in path:
    node = node[part]
  node[leaf] = value


def parse_overrides(pairs) -> dict:
  """["train.lr=1e-3", "model.scratch.heads=2"] -> {key: value}; values are Python literals
  (a bare word is a string)."""
  out = {}
  for pair in pairs or ():
    key, sep, text = pair.partition("=")
    if not sep or not key:
      raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
    try:
      out[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      out[key] = text
  return out


def _finish(config, workdir, steps, seed, data_dir, overrides, extra=None):
  config.workdir, config.seed = workdir, seed
  config.data.data_dir = data_dir
  if steps is not None:
    config.train.steps = steps
  for key, value in {**(extra or {}), **overrides}.items():
    set_field(config, key, value)
  return config


def stage1_config(workdir, *, steps=None, seed=0, data_dir="", overrides=None):
  """The InstructPix2Pix-style toy editor, from scratch, without rewards (`configs/ip2p.py:toy`)."""
  return _finish(ip2p.get_config("toy"), workdir, steps, seed, data_dir, overrides or {})


def stage2_config(
    workdir,
    stage1_export,
    *,
    rewards: bool,
    steps=None,
    seed=0,
    data_dir="",
    overrides=None,
    extra=None,
):
  """Stage 1 trained further (`configs/reward.py:toy`), with or without the reward condition."""
  c = reward.get_config("toy")
  c.model.pretrained = stage1_export
  c.model.reward.enabled = rewards
  return _finish(c, workdir, steps, seed, data_dir, overrides or {}, extra)


def smartedit_config(
    workdir, stage1_export, *, rewards: bool, steps=None, seed=0, data_dir="", overrides=None
):
  """The SmartEdit-style toy editor (`configs/smartedit.py:toy`) with stage 1's U-Net, CLIP text
  encoder and tokenizer (the release starts its U-Net from InstructPix2Pix's), trained on stage
  2's schedule (but 1,500 steps, the first 1,000 of them the alignment stage), with or without the
  reward condition; the LLM, ViT, Q-Former and BIM start from random weights."""
  c = smartedit.get_config("toy")
  common.apply_toy_stage2(c)
  # 1,500 steps: the first 1,000 the alignment stage (`model.smartedit.align_steps` of the toy
  # config; about 0.4 s per step, no U-Net), then 500 SmartEdit steps (1.4-1.6 s per step on the
  # CPU, four times the InstructPix2Pix step's cost). Without the alignment it learned no edit in
  # 1,500 SmartEdit steps.
  c.train.steps = 1500
  c.model.pretrained = stage1_export
  c.model.reward.enabled = rewards
  return _finish(c, workdir, steps, seed, data_dir, overrides or {})
