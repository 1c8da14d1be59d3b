"""SmartEdit's released checkpoint folder <-> our `SmartEdit` networks.

The release writes, per training step S (each file `.bin`, which needs torch, or the same tensors
as `.safetensors`):

  LLM-S/adapter_model.bin          the whole LLaMA (32035-row embeddings) with un-merged LoRA, as
                                   `model.base_model.model.<LlamaModel name>` (PEFT's
                                   `q_proj.lora_A.default.weight`; no lm_head)
  embeddings_qformer/checkpoint-S_embeddings_qformer.bin
                                   `lm_head.weight` (the release uses its last 35 rows),
                                   `mm_projector.{weight,bias}`, `sd_query_tokens`,
                                   `sd_qformer.*` (LAVIS names, `embeddings.position_ids` buffer)
  modulate-S/adapter_model.bin     the BIM (`mre.model_io.bim_weights`)
  unet-S/adapter_model.bin         the U-Net as `unet.<diffusers name>`

The CLIP vision tower comes from a Hugging Face CLIP folder; a LLaVA/Vicuna folder, when given,
supplies rows [:32000] of the embeddings and of `lm_head` (the release takes the original rows from
it, the 35 new rows from its own files). Every key of a release file is used or named as
unexpected; missing and mis-shaped tensors are named with the file they belong to. An
`embed_tokens` copy in the embeddings_qformer file (the release pops and ignores it) is accepted
and not used. Export writes the same layout (float32, `.safetensors` or `.bin`).

An *editor folder* (what `mre.edit --model=DIR` and `mre.eval --model=DIR` take) is a release
folder plus `smartedit.json` naming what the release's files lack (folders relative to DIR):

  {"clip": "../clip-vit-large-patch14", "ip2p": "../instruct-pix2pix",
   "base_llm": "../LLaVA-7B-v1", "llm_tokenizer": "../LLaVA-7B-v1", "step": 15000,
   "config": "7b" | "13b" | {sizes: `config_dict`}, "reward": {RewardConfig fields} | null}

`clip`, `ip2p` and `llm_tokenizer` (or `base_llm`, its default) are required; the commands'
`--smartedit_<key>` flags give or override any entry (so a release folder without the json works
too). `step` defaults to the only one, `config` to the release size the LLM file's width implies.
Every missing piece is named at once (`editor_options`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mre.model_io import bim_weights, clip_vision_weights, qformer_weights
from mre.model_io.safetensors_io import WeightsError, read_state_dict, write_safetensors
from mre.model_io.torch_state_dict import load_state_dict, materialize_non_params, state_dict
from mre.models import pixel
from mre.models.bim import BIMConfig
from mre.models.clip_vision import CLIPVisionConfig, CLIPVisionModel
from mre.models.config import UNetConfig, read_json
from mre.models.llama import LlamaConfig
from mre.models.lora import LoRAConfig, peft_key
from mre.models.qformer import QFormerConfig
from mre.models.reward_config import RewardConfig
from mre.models.reward_unet import RewardUNet
from mre.models.smartedit import SmartEdit, SmartEditConfig, abstract_smartedit, release_config
from mre.models.smartedit_prompt import TokenIds

LLM_PREFIX = "model.base_model.model."
UNET_PREFIX = "unet."
IGNORED_EMBED_COPY = LLM_PREFIX + "embed_tokens.weight"
ADAPTER = "default"  # PEFT's adapter name in the release's keys


def files(folder: str, step: Optional[int] = None, ext: Optional[str] = None) -> dict[str, str]:
  """The four files of one step of a release folder (the only step, unless `step` is given);
  every missing one is named."""
  steps = release_steps(folder)
  if not steps:
    raise FileNotFoundError(f"{folder} holds no LLM-<step> folder (not a SmartEdit release folder)")
  if step is None:
    if len(steps) > 1:
      raise ValueError(f"{folder} holds steps {steps}; pass step= (--smartedit_step)")
    step = steps[0]
  j = os.path.join
  stems = {
      "llm": j(folder, f"LLM-{step}", "adapter_model"),
      "embeddings_qformer": j(
          folder, "embeddings_qformer", f"checkpoint-{step}_embeddings_qformer"
      ),
      "modulate": j(folder, f"modulate-{step}", "adapter_model"),
      "unet": j(folder, f"unet-{step}", "adapter_model"),
  }
  found, missing = {}, []
  for part, stem in stems.items():
    there = [
        stem + e for e in ((ext,) if ext else (".safetensors", ".bin")) if os.path.exists(stem + e)
    ]
    if there:
      found[part] = there[0]
    else:
      missing.append(f"{os.path.relpath(stem, folder)}{ext or '.safetensors or .bin'}")
  if missing:
    here = "" if step in steps else f" (its steps: {steps})"
    raise FileNotFoundError(f"{folder} (step {step}{here}) lacks: " + "; ".join(missing))
  return found


def release_steps(folder: str) -> list[int]:
  """The steps S of the `LLM-S` folders in `folder`, sorted."""
  return sorted(
      {int(m.group(1)) for d in os.listdir(folder) if (m := re.fullmatch(r"LLM-(\d+)", d))}
  )


def read(path: str) -> dict[str, np.ndarray]:
  return bim_weights.read_bim_tensors(path)


def _ours_llm(name: str) -> str:
  return "model." + peft_key(name[len(LLM_PREFIX) :])


def _release_llm(name: str) -> str:
  name = re.sub(r"\.(lora_[AB])\.", rf".\1.{ADAPTER}.", name)
  return LLM_PREFIX + name[len("model.") :]


def _split_unexpected(tensors: dict, prefix: str, where: str) -> dict:
  bad = sorted(k for k in tensors if not k.startswith(prefix))
  if bad:
    raise WeightsError(f"{where}: unexpected tensors (not under {prefix!r}): {', '.join(bad[:12])}")
  return tensors


def load_llm(model: SmartEdit, llm: dict, head: dict, *, base: Optional[dict] = None, where="LLM"):
  """The LLaMA + LoRA from the LLM file and `lm_head.weight` of the embeddings file; `base` (a
  LLaVA/Vicuna state dict) replaces rows [:first added token] of the embeddings and lm_head."""
  _split_unexpected(llm, LLM_PREFIX, where)
  tensors = {_ours_llm(k): v for k, v in llm.items()}
  if "lm_head.weight" not in head:
    raise WeightsError(f"{where}: missing tensors: lm_head.weight (embeddings_qformer file)")
  tensors["lm_head.weight"] = head["lm_head.weight"]
  if base is not None:
    n = model.config.tokens.img
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
      if name not in base or base[name].shape[0] < n or name not in tensors:
        raise WeightsError(f"base LLaMA: {name} with at least {n} rows is missing")
      rows = np.array(tensors[name])
      rows[:n] = base[name][:n]
      tensors[name] = rows
  try:
    load_state_dict(model.llm, tensors, where=where)
  except WeightsError as e:  # name the tensors as the file does (the first line may hold a path)
    head, _, problems = str(e).partition("\n")
    back = lambda m: _release_llm(m.group(0))  # noqa: E731
    raise WeightsError(head + "\n" + re.sub(r"\bmodel\.[\w.]*\w", back, problems)) from None


def load_release(
    model: SmartEdit,
    folder: str,
    *,
    step: Optional[int] = None,
    clip: Optional[str] = None,
    base_llm: Optional[str] = None,
):
  """Copies a release folder's tensors into `model` (in place); `clip`: a CLIP vision or CLIPModel
  folder for the tower; `base_llm`: a LLaVA/Vicuna folder for the original vocabulary rows."""
  paths = files(folder, step)
  emb = dict(read(paths["embeddings_qformer"]))
  emb.pop(IGNORED_EMBED_COPY, None)
  head = {"lm_head.weight": emb.pop("lm_head.weight")} if "lm_head.weight" in emb else {}
  base = None
  if base_llm is not None:
    raw = read_state_dict(base_llm)
    base = {k: raw[k] for k in ("model.embed_tokens.weight", "lm_head.weight") if k in raw}
  load_llm(model, read(paths["llm"]), head, base=base, where=f"LLM in {paths['llm']}")
  projector = {k: emb.pop(k) for k in ("mm_projector.weight", "mm_projector.bias") if k in emb}
  clip_vision_weights.load_projector(
      model.mm_projector, projector, where=f"mm_projector in {paths['embeddings_qformer']}"
  )
  others = sorted(
      k
      for k in emb
      if not k.startswith(qformer_weights.LAVIS_PREFIX) and k != qformer_weights.LAVIS_QUERY_KEY
  )
  if others:
    raise WeightsError(
        f"{paths['embeddings_qformer']}: unexpected tensors: {', '.join(others[:12])}"
    )
  qformer_weights.load_qformer(
      model.sd_qformer, emb, layout="lavis", where=f"Q-Former in {paths['embeddings_qformer']}"
  )
  bim_weights.load_bim_state_dict(
      model.bim, read(paths["modulate"]), where=f"BIM in {paths['modulate']}"
  )
  unet = _split_unexpected(read(paths["unet"]), UNET_PREFIX, f"U-Net in {paths['unet']}")
  load_state_dict(model.unet, unet, where=f"U-Net in {paths['unet']}", prefix=UNET_PREFIX)
  if clip is not None:
    clip_vision_weights.load_clip_vision(
        model.vision_tower, read_state_dict(clip), where=f"CLIP vision tower in {clip}"
    )
  return model


def config_from_release(folder: str, step: Optional[int] = None) -> SmartEditConfig:
  """The release config (7B or 13B) that the LLM file's embedding width implies."""
  llm = read(files(folder, step)["llm"])
  width = np.shape(llm.get(LLM_PREFIX + "embed_tokens.weight", (0, 0)))[1]
  sizes = {4096: "7b", 5120: "13b"}
  if width not in sizes:
    raise WeightsError(
        f"{folder}: LLM width {width} is neither 7B's 4096 nor 13B's 5120; pass config="
    )
  return release_config(sizes[width])


def load_smartedit_folder(
    folder: str,
    *,
    config: Optional[SmartEditConfig] = None,
    step: Optional[int] = None,
    clip: Optional[str] = None,
    base_llm: Optional[str] = None,
    reward: Optional[RewardConfig] = None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
) -> SmartEdit:
  """A `SmartEdit` built without random initialisation and filled from a release folder. Without
  `clip` the vision tower (not in the release's files) is randomly initialised: tests only."""
  config = config or config_from_release(folder, step)
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  model = abstract_smartedit(config, reward=reward, **kw)
  if clip is None:
    model.vision_tower = CLIPVisionModel(config.vision, rngs=nnx.Rngs(0), **kw)
  load_release(model, folder, step=step, clip=clip, base_llm=base_llm)
  return materialize_non_params(model)


def release_tensors(model: SmartEdit) -> dict[str, dict[str, np.ndarray]]:
  """The four files' tensors (float32, PyTorch layout) under the release's names."""
  llm = {}
  for name, arr in state_dict(model.llm).items():
    if name != "lm_head.weight":
      llm[_release_llm(name)] = arr
  emb = {"lm_head.weight": state_dict(model.llm)["lm_head.weight"]}
  emb.update(clip_vision_weights.projector_state_dict(model.mm_projector))
  emb.update(qformer_weights.qformer_state_dict(model.sd_qformer, layout="lavis"))
  unet = state_dict(model.unet, prefix=UNET_PREFIX)
  return {
      "llm": llm,
      "embeddings_qformer": emb,
      "modulate": bim_weights.bim_state_dict(model.bim),
      "unet": unet,
  }


def save_smartedit_folder(model: SmartEdit, folder: str, step: int, *, ext: str = ".safetensors"):
  """Writes the release layout for `step` (`.bin` needs torch); returns the files written."""
  if ext not in (".safetensors", ".bin"):
    raise ValueError(f"ext={ext!r}: choose .safetensors or .bin")
  j = os.path.join
  paths = {
      "llm": j(folder, f"LLM-{step}", "adapter_model" + ext),
      "embeddings_qformer": j(
          folder, "embeddings_qformer", f"checkpoint-{step}_embeddings_qformer" + ext
      ),
      "modulate": j(folder, f"modulate-{step}", "adapter_model" + ext),
      "unet": j(folder, f"unet-{step}", "adapter_model" + ext),
  }
  for part, tensors in release_tensors(model).items():
    os.makedirs(os.path.dirname(paths[part]), exist_ok=True)
    if ext == ".bin":
      import torch  # pylint: disable=import-outside-toplevel

      torch.save({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, paths[part])
    else:
      write_safetensors(paths[part], tensors)
  lora = model.config.lora
  if lora is not None:  # what the release copies next to LLM-S (PEFT's adapter_config.json)
    with open(j(folder, "adapter_config.json"), "w") as f:
      json.dump(
          {
              "peft_type": "LORA",
              "task_type": "CAUSAL_LM",
              "r": lora.r,
              "lora_alpha": lora.alpha,
              "lora_dropout": lora.dropout,
              "target_modules": list(lora.target_modules),
              "bias": "none",
              "fan_in_fan_out": False,
          },
          f,
          indent=2,
      )
  return paths


def config_dict(config: SmartEditConfig) -> dict:
  """A JSON-able dict of a `SmartEditConfig` (the parts' own config dicts); `config_from_dict`
  reads it back."""
  raws = {
      "llm": config.llm.raw,
      "vision": config.vision.raw,
      "qformer": config.qformer.raw,
      "unet": config.unet.raw,
  }
  lost = sorted(k for k, v in raws.items() if v is None)
  if lost:
    raise ValueError(f"SmartEditConfig parts {lost} were built without a config dict")
  return {
      **raws,
      "bim": dataclasses.asdict(config.bim),
      "tokens": dataclasses.asdict(config.tokens),
      "lora": None if config.lora is None else dataclasses.asdict(config.lora),
      "vision_layer": config.vision_layer,
  }


def config_from_dict(d: dict) -> SmartEditConfig:
  """`config_dict`'s inverse; unknown or missing keys are named."""
  keys = ("llm", "vision", "qformer", "bim", "unet", "tokens", "lora", "vision_layer")
  unknown, missing = sorted(set(d) - set(keys)), [k for k in keys[:5] if k not in d]
  if unknown or missing:
    raise ValueError(f"SmartEdit config: unknown keys {unknown}, missing keys {missing}")
  return SmartEditConfig(
      LlamaConfig.from_dict(d["llm"]),
      CLIPVisionConfig.from_dict(d["vision"]),
      QFormerConfig.from_dict(d["qformer"]),
      BIMConfig.from_dict(d["bim"]),
      UNetConfig.from_dict(d["unet"]),
      TokenIds(**d.get("tokens", {})),
      None if d.get("lora") is None else LoRAConfig(**d["lora"]),
      d.get("vision_layer", -2),
  ).check()


def null_context(text_encoder, tokenizer) -> jax.Array:
  """CLIP's last hidden state of the empty prompt [1, 77, D]: the unconditional text branch."""
  from mre.pipeline import tokenize  # pylint: disable=import-outside-toplevel

  hidden, _ = text_encoder(tokenize(tokenizer, [""]))
  return hidden


def check_diffusers_parts(config: SmartEditConfig, ip2p: str):
  """Refuses a diffusers folder whose VAE or CLIP text encoder does not fit the U-Net."""
  vae = read_json(os.path.join(ip2p, "vae"))
  latent = vae["channels"] if _pixel_space(vae) else vae["latent_channels"]
  width = read_json(os.path.join(ip2p, "text_encoder"))["hidden_size"]
  unet = config.unet
  bad = []
  if unet.in_channels != 2 * latent or unet.out_channels != latent:
    bad.append(
        f"its VAE has {latent} latent channels, the U-Net takes {unet.in_channels} "
        f"(2 x latent) and gives {unet.out_channels}"
    )
  if width != unet.cross_attention_dim:
    bad.append(
        f"its CLIP text encoder is {width} wide (the null context), the U-Net's context "
        f"{unet.cross_attention_dim}"
    )
  if bad:
    raise ValueError(f"{ip2p} does not fit this SmartEdit: " + "; ".join(bad))


def load_smartedit_pipeline(
    folder: str,
    *,
    clip: str,
    ip2p: str,
    llm_tokenizer: str,
    base_llm: Optional[str] = None,
    step: Optional[int] = None,
    config: Optional[SmartEditConfig] = None,
    reward: Optional[RewardConfig] = None,
    dtype=jnp.float32,
):
  """The whole editor: the release folder, the CLIP vision folder, an InstructPix2Pix (or SD 1.5)
  diffusers folder for the VAE, the CLIP text encoder (null context), tokenizer and scheduler, and
  the LLaMA tokenizer folder (transformers' AutoTokenizer, with the 35 tokens split by us).
  `config`: the sizes (default: the release's 7B or 13B, from the LLM file)."""
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel

  from mre.model_io import diffusers_folder  # pylint: disable=import-outside-toplevel
  from mre.smartedit_editor import SmartEditPipeline  # pylint: disable=import-outside-toplevel

  config = config or config_from_release(folder, step)
  check_diffusers_parts(config, ip2p)
  sub = lambda name: os.path.join(ip2p, name)  # noqa: E731
  text_encoder = diffusers_folder.load_text_encoder(sub("text_encoder"), dtype=dtype)
  tokenizer = diffusers_folder.load_tokenizer(sub("tokenizer"))
  null = null_context(text_encoder, tokenizer)
  if null.shape[1] != config.qformer.num_query_tokens:
    raise ValueError(
        f"{ip2p}: the empty prompt's CLIP context has {null.shape[1]} tokens, the Q-Former "
        f"{config.qformer.num_query_tokens} queries; the guidance branches need the same length"
    )
  tok = AutoTokenizer.from_pretrained(llm_tokenizer, local_files_only=True)
  with open(sorted(glob.glob(sub("scheduler/*.json")))[0]) as f:
    scheduler = json.load(f)
  model = load_smartedit_folder(
      folder, config=config, step=step, clip=clip, base_llm=base_llm, reward=reward, dtype=dtype
  )
  return SmartEditPipeline(
      model=model,
      vae=diffusers_folder.load_vae(sub("vae"), dtype=dtype),
      null_context=null,
      encode=lambda text: tok(text, add_special_tokens=False).input_ids,
      scheduler_config=scheduler,
      text_encoder=text_encoder,
      tokenizer=tokenizer,
  )


# An editor folder: the release layout plus smartedit.json naming the other folders it needs.
EDITOR_JSON = "smartedit.json"
FOLDERS = {
    "clip": "a Hugging Face CLIP or CLIP vision folder (openai/clip-vit-large-patch14)",
    "ip2p": "an InstructPix2Pix or SD 1.5 diffusers folder (vae/, text_encoder/, tokenizer/, "
    "scheduler/)",
    "llm_tokenizer": "the LLaVA/Vicuna tokenizer folder (default: base_llm)",
    "base_llm": "a LLaVA/Vicuna folder for the original 32,000 vocabulary rows (optional)",
}
EDITOR_KEYS = tuple(FOLDERS) + ("step", "config", "reward")


def is_editor_folder(folder: str) -> bool:
  """A SmartEdit editor folder: `smartedit.json`, or the release's `LLM-<step>/`."""
  return os.path.exists(os.path.join(folder, EDITOR_JSON)) or bool(release_steps(folder))


def _pixel_space(vae_config: dict) -> bool:
  """A toy editor's `PixelSpace` "VAE" (config only, no weights; `diffusers_folder.save_vae`)."""
  return vae_config.get("_class_name") == pixel.CLASS_NAME


def _weights(folder: str) -> bool:
  return any(glob.glob(os.path.join(folder, p)) for p in ("*.safetensors", "*.bin"))


def _folder_problems(key: str, path: str) -> list[str]:
  """What is missing in the folder given for `key` (none when it holds what loading reads)."""
  if not os.path.isdir(path):
    return [f"{key} folder {path} does not exist ({FOLDERS[key]})"]
  lacks = []
  if key in ("clip", "base_llm"):
    lacks += [] if _weights(path) else ["*.safetensors or *.bin weights"]
    lacks += (
        []
        if key == "base_llm" or os.path.exists(os.path.join(path, "config.json"))
        else ["config.json"]
    )
  elif key == "ip2p":
    for sub in ("vae", "text_encoder"):
      d = os.path.join(path, sub)
      has_config = os.path.exists(os.path.join(d, "config.json"))
      lacks += [] if has_config else [f"{sub}/config.json"]
      pixels = sub == "vae" and has_config and _pixel_space(read_json(d))  # no weights to have
      lacks += [] if _weights(d) or pixels else [f"{sub}/ weights"]
    lacks += [] if os.path.isdir(os.path.join(path, "tokenizer")) else ["tokenizer/"]
    lacks += [] if glob.glob(os.path.join(path, "scheduler", "*.json")) else ["scheduler/*.json"]
  elif key == "llm_tokenizer":
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if not any(os.path.exists(os.path.join(path, n)) for n in names):
      lacks.append(" or ".join(names))
  return [f"{key} folder {path} lacks {', '.join(lacks)}"] if lacks else []


def editor_options(folder: str, overrides: Optional[dict] = None) -> dict:
  """What loading an editor folder needs: `smartedit.json`'s entries (relative folders taken from
  `folder`), overridden by the non-None ones of `overrides` (the command's flags; relative folders
  taken from the working directory). Every missing piece (release file, folder, file in a folder)
  is named at once."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"model folder {folder} does not exist")
  path = os.path.join(folder, EDITOR_JSON)
  options = read_json(path) if os.path.exists(path) else {}
  unknown = sorted(set(options) - set(EDITOR_KEYS))
  if unknown:
    raise ValueError(f"{path}: unknown keys {unknown} (known: {list(EDITOR_KEYS)})")
  for key in FOLDERS:  # the json's folders relative to it, the flags' to the working directory
    if options.get(key):
      options[key] = os.path.join(os.path.abspath(folder), os.path.expanduser(options[key]))
  for key, value in (overrides or {}).items():
    if value is not None:
      options[key] = os.path.abspath(os.path.expanduser(value)) if key in FOLDERS else value
  if not options.get("llm_tokenizer") and options.get("base_llm"):
    options["llm_tokenizer"] = options["base_llm"]
  problems = []
  try:
    files(folder, options.get("step"))
  except (FileNotFoundError, ValueError) as e:
    problems.append(str(e))
  for key, what in FOLDERS.items():
    if options.get(key):
      problems += _folder_problems(key, options[key])
    elif key != "base_llm":
      problems.append(f'no {key} ({what}): "{key}" in {EDITOR_JSON} or --smartedit_{key}')
  if problems:
    raise FileNotFoundError(
        f"SmartEdit editor folder {folder} is incomplete:\n  - " + "\n  - ".join(problems)
    )
  return options


def load_editor_folder(folder: str, overrides: Optional[dict] = None, *, dtype=jnp.float32):
  """A `SmartEditPipeline` from an editor folder (`editor_options`)."""
  o = editor_options(folder, overrides)
  config = o.get("config")
  if isinstance(config, str):
    config = release_config(config)
  elif config is not None:
    config = config_from_dict(config)
  reward = o.get("reward")
  if reward is not None:
    names = {f.name for f in dataclasses.fields(RewardConfig)}
    if set(reward) - names:
      raise ValueError(f"{EDITOR_JSON}: unknown reward keys {sorted(set(reward) - names)}")
    reward = RewardConfig(**reward)
  return load_smartedit_pipeline(
      folder,
      clip=o["clip"],
      ip2p=o["ip2p"],
      llm_tokenizer=o["llm_tokenizer"],
      base_llm=o.get("base_llm"),
      step=o.get("step"),
      config=config,
      reward=reward,
      dtype=dtype,
  )


def write_editor_json(folder: str, *, model: Optional[SmartEdit] = None, **entries):
  """`smartedit.json`: the folders (`clip`, `ip2p`, `llm_tokenizer`, `base_llm`; relative ones
  are taken from `folder`), `step`; with `model`, its sizes and reward form (needed unless it is
  the release's 7B or 13B without reward)."""
  unknown = sorted(set(entries) - set(EDITOR_KEYS))
  if unknown:
    raise ValueError(f"unknown {EDITOR_JSON} keys {unknown} (known: {list(EDITOR_KEYS)})")
  out = {k: v for k, v in entries.items() if v is not None}
  if model is not None:
    out["config"] = config_dict(model.config)
    if isinstance(model.unet, RewardUNet):
      out["reward"] = dataclasses.asdict(model.unet.reward_config)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, EDITOR_JSON), "w") as f:
    json.dump(out, f, indent=2)
  return os.path.join(folder, EDITOR_JSON)
