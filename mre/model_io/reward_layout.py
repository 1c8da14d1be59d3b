"""The reward U-Net's checkpoint layouts: ours (settings recorded in config.json) and the release's.

Our exported `unet/config.json` records the reward settings under `mre_reward` (and the pooled text
width under `mre_reward_text_dim`); diffusers ignores the extra keys. The released stage-2 U-Net
records nothing: its settings are read off its tensor names (`add_embedding.linear_*` for the score
embedding, `text_linear*` for the failure texts, `proj_deal.*` and `ca.*` for the latent path). Both
forms keep the tensor names the modules have, so a state dict imports and exports unchanged
(docs/released_reward_form.md).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from mre.model_io.safetensors_io import read_state_dict
from mre.model_io.torch_state_dict import load_state_dict, materialize_non_params
from mre.models.config import UNetConfig, read_json
from mre.models.reward_config import RewardConfig
from mre.models.reward_unet import RewardUNet

CONFIG_KEY = "mre_reward"  # where our exported config.json records the reward settings
TEXT_DIM_KEY = "mre_reward_text_dim"


def has_reward(tensors: dict, cfg: dict) -> bool:
  # `add_embedding.linear_1`: the release's score embedding; a plain U-Net with
  # addition_embed_type "text" has an `add_embedding` too (norm1, pool, proj, norm2).
  released = ("add_embedding.linear_", "add_embedding2.", "text_linear", "proj_deal.")
  return CONFIG_KEY in cfg or any(k.startswith(released) for k in tensors)


def reward_config_of(tensors: dict, cfg: dict) -> RewardConfig:
  """The reward settings of a U-Net checkpoint: recorded by us, or inferred from released names."""
  if CONFIG_KEY in cfg:
    return RewardConfig(**cfg[CONFIG_KEY])
  has = lambda prefix: any(k.startswith(prefix) for k in tensors)
  if not (has("add_embedding.linear_") or has("text_linear") or has("proj_deal.")):
    raise ValueError(
        "this U-Net checkpoint has no reward modules (neither our `mre_reward` "
        "config entry nor the released `add_embedding`/`proj_deal`/`ca` tensors)"
    )
  return RewardConfig(
      form="released",
      use_scores=has("add_embedding.linear_"),
      use_texts=has("text_linear"),
      inject_latent=has("proj_deal."),
      inject_unet=has("add_embedding.linear_") or has("text_linear2."),
  )


def load_reward_unet(
    folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, remat=(), tensors=None
):
  """A reward U-Net from a diffusers-format `unet/` folder: ours, or the released stage-2 one."""
  raw = read_json(folder)
  tensors = read_state_dict(folder) if tensors is None else tensors
  reward = reward_config_of(tensors, raw)
  text_dim = None
  for name in ("text_linear.weight", "text_linear2.weight"):
    if name in tensors:
      text_dim = tensors[name].shape[1]
  text_dim = raw.get(TEXT_DIM_KEY, text_dim)
  cfg = UNetConfig.from_dict(raw)
  model = nnx.eval_shape(
      lambda: RewardUNet(
          cfg,
          reward,
          text_dim=text_dim,
          dtype=dtype,
          param_dtype=param_dtype,
          remat=remat,
          rngs=nnx.Rngs(0),
      )
  )
  load_state_dict(model, tensors, where=f"reward U-Net in {folder}")
  return materialize_non_params(model)


def reward_unet_from_config(raw: dict, **kw) -> RewardUNet:
  """A (randomly initialised) RewardUNet from a config dict written by `export_config`."""
  return RewardUNet(raw, RewardConfig(**raw[CONFIG_KEY]), text_dim=raw.get(TEXT_DIM_KEY), **kw)


def export_config(model: RewardUNet) -> dict:
  """config.json content: the U-Net's, plus our reward settings under `mre_reward`.

  A released-form model keeps the release's tensor names, so the public code loads its weights;
  the extra keys are ignored by diffusers.
  """
  raw = dict(model.config.raw)
  raw[CONFIG_KEY] = dataclasses.asdict(model.reward_config)
  raw[TEXT_DIM_KEY] = model.text_dim
  return raw
