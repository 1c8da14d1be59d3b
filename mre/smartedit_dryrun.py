"""Dry run of the SmartEdit-style editor: parameter counts and a per-device memory estimate, built
with `nnx.eval_shape` (nothing is allocated, nothing is loaded).

  python -m mre.smartedit_dryrun --config=configs/smartedit.py [--fsdp=8] [--tensor=2]

The estimate counts parameters (param_dtype) sharded as the trainer shards them (the largest
divisible axis over `fsdp` for tensors of at least `mesh.fsdp_min_size` elements; with a `tensor`
axis the LLM's attention and MLP projections split by heads and columns first, mre/sharding.py),
and for the trained parts their gradients (param_dtype), AdamW's two moments (float32) and an EMA copy when
`train.ema_decay` > 0. The frozen VAE (and, for a model loaded from a folder, the CLIP text
encoder) count whole on every device: the trainer replicates them. Activations are not counted:
they depend on batch, resolution and remat.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from mre import sharding
from mre.model_setup import dtype_of, reward_config
from mre.models.config import VAEConfig
from mre.models.lora import LoRAConfig, LoRAParam
from mre.models.smartedit import abstract_smartedit, release_config, tiny_config
from mre.models.vae import AutoencoderKL

PARTS = ("llm", "vision_tower", "mm_projector", "sd_qformer", "bim", "unet", "vae")
# The pipeline's frozen encoders (attribute names) that the trainer replicates on every device
# (mre/smartedit_train.py): each device holds them whole, whatever the mesh.
REPLICATED = ("vae", "text_encoder")
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
}


def smartedit_config(config):
  """The `SmartEditConfig` a training config names (`model.smartedit`)."""
  s = config.model.smartedit
  lora = LoRAConfig(
      r=s.lora_r, alpha=s.lora_alpha, dropout=s.lora_dropout, target_modules=tuple(s.lora_targets)
  )
  base = tiny_config(latent_channels=3) if s.size == "toy" else release_config(s.size)
  return dataclasses.replace(base, lora=lora).check()


def abstract_parts(config) -> dict:
  """{part: abstract nnx.State of its parameters}, from `nnx.eval_shape`."""
  kw = dict(dtype=dtype_of(config.model.dtype), param_dtype=dtype_of(config.model.param_dtype))
  cfg = smartedit_config(config)
  model = abstract_smartedit(cfg, reward=reward_config(config), **kw)
  parts = {name: nnx.state(getattr(model, name), nnx.Param) for name in PARTS[:-1]}
  if config.model.smartedit.size != "toy":  # latent space: SD 1.5's VAE (the toy: pixels)
    vae = nnx.eval_shape(
        lambda: AutoencoderKL(VAEConfig.from_dict(SD15_VAE), rngs=nnx.Rngs(0), **kw)
    )
    parts["vae"] = nnx.state(vae, nnx.Param)
  return parts


def _is_trained(part: str, path, var, trained) -> bool:
  if part in trained:  # a whole part (the toy trains the LLM, vision tower, projector too)
    return True
  if part == "llm":
    if isinstance(var, LoRAParam):
      return "lora" in trained
    # The whole embedding and lm_head matrices get gradients and optimizer state in the release
    # (the old rows are restored after each step).
    return "embeddings" in trained and ("embed_tokens" in path or "lm_head" in path)
  return False


@dataclasses.dataclass
class PartSize:
  params: int = 0
  trained: int = 0
  device_bytes: float = 0.0


def model_parts(model, vae=None, text_encoder=None) -> dict:
  """{part: nnx.State of its parameters} of a built SmartEdit (and its VAE and CLIP text encoder,
  if any): what `estimate` counts for a model loaded from a folder, whose sizes are the folder's."""
  parts = {name: nnx.state(getattr(model, name), nnx.Param) for name in PARTS[:-1]}
  for name, frozen in (("vae", vae), ("text_encoder", text_encoder)):
    if frozen is not None:
      parts[name] = nnx.state(frozen, nnx.Param)
  return parts


def estimate(config, fsdp: int, tensor: int = 1, parts=None) -> dict[str, PartSize]:
  """Parameter counts and per-device bytes per part on an (fsdp, tensor) mesh; `parts`
  (`model_parts`) instead of the sizes `config` names."""
  axis_size = {"fsdp": fsdp, "tensor": tensor}
  trained = set(config.model.smartedit.trained)
  min_size = config.mesh.fsdp_min_size
  ema = config.train.ema_decay > 0
  out = {}
  for part, state in (parts if parts is not None else abstract_parts(config)).items():
    size = PartSize()
    for path, var in nnx.to_flat_state(state):
      shape, dtype = var.get_value().shape, var.get_value().dtype
      n = int(np.prod(shape, dtype=np.int64))
      if part in REPLICATED:
        split = 1
      else:
        spec = sharding.param_spec(shape, fsdp, min_size, tensor, sharding.tensor_dim(path))
        split = int(np.prod([axis_size[a] for a in spec if a is not None]))
      per = np.dtype(dtype).itemsize
      size.params += n
      nbytes = n * per
      if _is_trained(part, [str(p) for p in path], var, trained):
        size.trained += n
        nbytes += n * per + 2 * n * 4 + (n * per if ema else 0)
      size.device_bytes += nbytes / split
    out[part] = size
  return out


def report(config, fsdp: int = 8, tensor: int = 1, parts=None, name=None) -> str:
  """The table of `estimate`; `name` heads it (default: the configured size)."""
  sizes = estimate(config, fsdp, tensor, parts)
  mesh = f"({fsdp},) fsdp" if tensor == 1 else f"({fsdp}, {tensor}) fsdp x tensor"
  name = name or config.model.smartedit.size
  lines = [
      f"SmartEdit {name}: parameters and per-device memory on an {mesh} "
      f"mesh (params {config.model.param_dtype}, AdamW moments float32, no activations)",
      f"{'part':<14}{'params':>16}{'trained':>16}{'GiB/device':>12}",
  ]
  for part, s in sizes.items():
    lines.append(f"{part:<14}{s.params:>16,}{s.trained:>16,}{s.device_bytes / 2**30:>12.2f}")
  total = PartSize(
      sum(s.params for s in sizes.values()),
      sum(s.trained for s in sizes.values()),
      sum(s.device_bytes for s in sizes.values()),
  )
  lines.append(
      f"{'total':<14}{total.params:>16,}{total.trained:>16,}{total.device_bytes / 2**30:>12.2f}"
  )
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/smartedit.py")
  if config.model.family != "smartedit":
    raise app.UsageError(f"model.family={config.model.family!r}: this dry run is SmartEdit's")
  print(report(config, flags.FLAGS.fsdp, flags.FLAGS.tensor))


if __name__ == "__main__":
  # Defined only when run as a command: importing this module (tests) must not claim --config,
  # which mre.train defines too.
  config_flags.DEFINE_config_file("config", None, "configs/smartedit.py[:toy]")
  flags.DEFINE_integer("fsdp", 8, "devices of the fsdp mesh axis the estimate assumes")
  flags.DEFINE_integer(
      "tensor", 1, "devices of the tensor mesh axis (attention heads, MLP columns)"
  )
  app.run(main)
