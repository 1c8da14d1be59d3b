"""The editor a training config asks for: from pretrained folders, or from scratch (the toy world).

Stage 1 (`ip2p`) starts from an SD 1.5 pipeline folder and widens `conv_in` to 8 channels; stage 2
(`reward`) starts from a stage-1 pipeline folder and adds the reward modules. With
`model.pretrained=""` everything is built from scratch at the `model.scratch` sizes, in pixel space,
with a tokenizer over the dataset's closed vocabulary (the toy world). The training schedule is the
start folder's, with the fields `model.scheduler` sets applied over it (`apply_scheduler_settings`).
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
from absl import logging
from flax import nnx

from mre.diffusion.schedule import check_prediction_type, schedule_from_config
from mre.model_io import native_format
from mre.model_io.diffusers_folder import ip2p_unet_from_sd15, load_pipeline, load_tokenizer
from mre.model_io.folders import load_any
from mre.model_io.word_tokenizer import write_word_tokenizer
from mre.models.clip_text import CLIPTextModel
from mre.models.config import read_json
from mre.models.pixel import PixelSpace
from mre.models.reward_config import RewardConfig
from mre.models.reward_unet import RewardUNet, reward_unet_from_stage1
from mre.models.unet import UNet2DConditionModel
from mre.pipeline import Pipeline

FAMILIES = ("instructpix2pix",)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
  return DTYPES[name]


def reward_config(config) -> RewardConfig | None:
  r = config.model.reward
  if not r.enabled:
    return None
  fields = {k: v for k, v in r.items() if k != "enabled"}
  return RewardConfig(**fields)


# The training schedule of a from-scratch model where `model.scheduler` leaves a field unset: SD 1.x's.
SCRATCH_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
SCHEDULER_FIELDS = ("beta_schedule", "beta_start", "beta_end", "prediction_type")


def scheduler_settings(config) -> dict:
  """The `model.scheduler` fields the config sets (a field left None is not set), checked."""
  s = config.model.scheduler
  unknown = sorted(set(s.keys()) - set(SCHEDULER_FIELDS))
  if unknown:
    raise ValueError(f"model.scheduler has unknown field(s) {unknown}; known: {SCHEDULER_FIELDS}")
  out = {k: s[k] for k in SCHEDULER_FIELDS if s.get(k) is not None}
  if "prediction_type" in out:
    check_prediction_type(out["prediction_type"])
  return out


def scheduler_config(config) -> dict:
  """The scheduler config of a from-scratch model: `model.scheduler` over SCRATCH_SCHEDULER."""
  cfg = {**SCRATCH_SCHEDULER, **scheduler_settings(config)}
  schedule_from_config(cfg)  # refuses what the samplers and the trainer do not implement
  return cfg


def apply_scheduler_settings(config, folder_config: dict, where: str) -> dict:
  """The start folder's scheduler config with the `model.scheduler` fields the config sets.

  A pretrained start keeps its folder's schedule unless the config sets a field: a set field that
  differs from the folder's value (as the folder's config reads, diffusers' defaults filled in)
  replaces it, and a warning names the field and both values. The result is what the model is
  trained with and what its export records, so the editor samples with the same schedule.
  """
  settings = scheduler_settings(config)
  current = schedule_from_config(folder_config)
  changed = {k: v for k, v in settings.items() if getattr(current, k) != v}
  for key, value in changed.items():
    if key.startswith("beta_") and current.trained_betas is not None:
      raise ValueError(
          f"model.scheduler.{key}={value!r} cannot apply: the scheduler config in "
          f"{where} lists its betas (trained_betas)"
      )
  out = {**folder_config, **changed}
  schedule_from_config(out)  # refuses what the samplers and the trainer do not implement
  for key, value in changed.items():
    logging.warning(
        "model.scheduler.%s=%r replaces %r, the value of the scheduler config in %s",
        key,
        value,
        getattr(current, key),
        where,
    )
  return out


def scratch_unet_config(config, channels: int, context_dim: int) -> dict:
  s = config.model.scratch
  n = len(s.unet_channels)
  # Like SD, the lowest level has no transformer; `attention_from_level` also drops it from the
  # first levels, where attention over all pixels costs most.
  attn = [s.attention_from_level <= i < n - 1 for i in range(n)]
  if s.get("source_skip_sigma_data", 0.0) and not s.source_skip:
    raise ValueError(
        "model.scratch.source_skip_sigma_data preconditions the source skip: set "
        "model.scratch.source_skip=True too (or source_skip_sigma_data=0)"
    )
  affine = s.get("source_skip_affine", False)
  if affine and not s.source_skip:
    raise ValueError(
        "model.scratch.source_skip_affine extends the source skip: set "
        "model.scratch.source_skip=True too (or source_skip_affine=False)"
    )
  return {
      "_class_name": "UNet2DConditionModel",
      "sample_size": config.data.resolution,
      "in_channels": 2 * channels,
      # the affine source skip also predicts a channels x channels matrix per pixel
      "out_channels": channels + channels**2 if affine else channels,
      "block_out_channels": list(s.unet_channels),
      "layers_per_block": s.layers_per_block,
      "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
      "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]],
      "cross_attention_dim": context_dim,
      "attention_head_dim": s.heads,
      "norm_num_groups": s.norm_groups,
      "only_cross_attention": s.only_cross_attention,
      "resnet_time_scale_shift": s.get("time_scale_shift", "default"),
      # ours (mre/diffusion/source_skip.py): the denoiser relative to the source image
      **({"mre_source_skip": True} if s.source_skip else {}),
      **(
          {"mre_source_skip_sigma_data": float(s.source_skip_sigma_data)}
          if s.source_skip and s.get("source_skip_sigma_data", 0.0)
          else {}
      ),
      **({"mre_source_skip_affine": True} if affine else {}),
      **({"mre_noisy_skip": True} if s.get("noisy_skip", False) else {}),
      **({"mre_pixel_head": int(s.pixel_head)} if s.get("pixel_head", 0) else {}),
      **({"mre_pixel_head_only": True} if s.get("pixel_head_only", False) else {}),
      **(
          {"mre_pixel_head_input_scale": float(s.pixel_head_input_scale)}
          if s.get("pixel_head_input_scale", 1.0) != 1.0
          else {}
      ),
      **(
          {"mre_pixel_head_fourier": int(s.pixel_head_fourier)}
          if s.get("pixel_head_fourier", 0)
          else {}
      ),
      **({"mre_pixel_head_gate": True} if s.get("pixel_head_gate", False) else {}),
      **(
          {"mre_pixel_head_text_attention": int(s.pixel_head_text_attention)}
          if s.get("pixel_head_text_attention", 0)
          else {}
      ),
      **({"mre_self_condition": True} if s.get("self_condition", False) else {}),
      # diffusers' TextTimeEmbedding: the pooled instruction joins the time embedding
      **(
          {"addition_embed_type": "text", "addition_embed_type_num_heads": s.text_heads}
          if s.text_time_embedding
          else {}
      ),
  }


@dataclasses.dataclass
class Models:
  """What the trainer starts from, built in one pass (`build_models`).

  pipe: the editor's pieces. From scratch its U-Net and text encoder hold shapes only
    (`nnx.eval_shape`): the trainer creates their parameters sharded, with `makers`.
  makers: zero-argument constructors of the from-scratch U-Net and text encoder (random weights,
    `config.seed`), which the trainer calls inside `jax.jit` with sharded outputs so the
    parameters are created directly on their devices; empty for a pretrained start.
  """

  pipe: Pipeline
  makers: dict


def _scratch_makers(config, tokenizer) -> dict:
  s = config.model.scratch
  if not s.pixel_space:
    raise ValueError(
        "model.scratch.pixel_space=False (a from-scratch autoencoder) is not built; "
        "start from a pretrained folder instead"
    )
  dtype, pdtype = dtype_of(config.model.dtype), dtype_of(config.model.param_dtype)
  remat = tuple(config.model.remat)
  text_cfg = {
      "vocab_size": len(tokenizer),
      "hidden_size": s.text_hidden,
      "intermediate_size": 4 * s.text_hidden,
      "num_hidden_layers": s.text_layers,
      "num_attention_heads": s.text_heads,
      "max_position_embeddings": 77,
      "eos_token_id": tokenizer.eos_token_id,
      "hidden_act": "quick_gelu",
  }
  unet_cfg = scratch_unet_config(config, 3, s.text_hidden)
  r = reward_config(config)

  def make_unet():
    rngs = nnx.Rngs(config.seed)
    if r is None:
      return UNet2DConditionModel(unet_cfg, dtype=dtype, param_dtype=pdtype, remat=remat, rngs=rngs)
    return RewardUNet(
        unet_cfg, r, text_dim=s.text_hidden, dtype=dtype, param_dtype=pdtype, remat=remat, rngs=rngs
    )

  def make_text():
    return CLIPTextModel(text_cfg, dtype=dtype, param_dtype=pdtype, rngs=nnx.Rngs(config.seed + 1))

  return {"unet": make_unet, "text_encoder": make_text}


def scratch_models(config, vocab_words, tokenizer_dir: str) -> Models:
  """The toy editor: tokenizer over the dataset vocabulary, pixel space, tiny U-Net and CLIP, the
  networks as shapes plus their makers (see `Models`)."""
  tokenizer = load_tokenizer(
      write_word_tokenizer(tokenizer_dir, vocab_words, max_length=config.model.scratch.max_tokens)
  )
  makers = _scratch_makers(config, tokenizer)
  pipe = Pipeline(
      unet=nnx.eval_shape(makers["unet"]),
      vae=PixelSpace({"channels": 3}),
      text_encoder=nnx.eval_shape(makers["text_encoder"]),
      tokenizer=tokenizer,
      scheduler_config=scheduler_config(config),
      model_index={},
  )
  return Models(pipe, makers)


def build_scratch(config, vocab_words, tokenizer_dir: str, *, abstract=True) -> Pipeline:
  """The toy editor's pieces (`scratch_models`); with `abstract=False` the networks get their
  random weights at once, unsharded (tests and tools that edit with an untrained model)."""
  models = scratch_models(config, vocab_words, tokenizer_dir)
  if not abstract:
    models.pipe.unet = models.makers["unet"]()
    models.pipe.text_encoder = models.makers["text_encoder"]()
  return models.pipe


def _missing(config, path):
  stage = (
      "an SD 1.5 pipeline folder (stage 1 starts from it)"
      if config.stage == "ip2p"
      else "a stage-1 InstructPix2Pix pipeline folder (diffusers format or mre checkpoint)"
  )
  return FileNotFoundError(
      f"config.model.pretrained={path!r} does not exist. This recipe needs {stage} on local disk; "
      "nothing is downloaded. Set --config.model.pretrained=/path/to/folder, or run the offline "
      f"toy world instead: --config=configs/{config.stage if config.stage == 'reward' else 'ip2p'}"
      ".py:toy"
  )


def check_pretrained(config):
  """Fails at once, naming the path, when the recipe's starting weights are not on disk."""
  if config.model.family not in FAMILIES:
    raise ValueError(
        f"config.model.family={config.model.family!r} is not available; built: "
        f"{FAMILIES} (the SmartEdit-style family is planned, not built)"
    )
  if config.model.pretrained and not os.path.isdir(config.model.pretrained):
    raise _missing(config, config.model.pretrained)


def build_pretrained(config) -> Pipeline:
  path = config.model.pretrained
  check_pretrained(config)
  dtype, pdtype = dtype_of(config.model.dtype), dtype_of(config.model.param_dtype)
  remat = tuple(config.model.remat)
  unet_dir = os.path.join(path, "unet")
  if native_format.is_native(path):  # an mre checkpoint (e.g. a toy stage-1 export): as it is
    pipe = load_any(path, dtype=dtype, param_dtype=pdtype, remat=remat)
  elif config.stage == "ip2p" and read_json(unet_dir).get("in_channels") == 4:  # SD 1.5: widen
    pipe = load_pipeline(
        path,
        dtype=dtype,
        param_dtype=pdtype,
        remat=remat,
        unet=ip2p_unet_from_sd15(unet_dir, dtype=dtype, param_dtype=pdtype, remat=remat),
    )
  elif config.stage == "ip2p":
    pipe = load_pipeline(path, dtype=dtype, param_dtype=pdtype, remat=remat)
  else:
    pipe = load_any(path, dtype=dtype, param_dtype=pdtype, remat=remat)
  r = reward_config(config)
  if r is not None and not isinstance(pipe.unet, RewardUNet):
    pipe.unet = reward_unet_from_stage1(
        pipe.unet, r, seed=config.seed, dtype=dtype, param_dtype=pdtype, remat=remat
    )
  if r is None and isinstance(pipe.unet, RewardUNet):
    raise ValueError(f"{path} holds a reward-conditioned U-Net but model.reward.enabled=False")
  pipe.scheduler_config = apply_scheduler_settings(config, pipe.scheduler_config, path)
  return pipe


def build_models(config, vocab_words=None, tokenizer_dir=None) -> Models:
  """Everything the trainer needs to start: from `model.pretrained`, or from scratch (the toy world,
  whose tokenizer is built over `vocab_words` in `tokenizer_dir`)."""
  check_pretrained(config)
  if config.model.pretrained:
    return Models(build_pretrained(config), makers={})
  if vocab_words is None:
    raise ValueError(
        "a from-scratch model (model.pretrained='') needs the dataset's vocabulary; "
        "only the toy world provides one"
    )
  return scratch_models(config, vocab_words, tokenizer_dir)
