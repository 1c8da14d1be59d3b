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
"""

from __future__ import annotations

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
from mre.models.clip_vision import CLIPVisionModel
from mre.models.lora import peft_key
from mre.models.reward_config import RewardConfig
from mre.models.smartedit import SmartEdit, SmartEditConfig, abstract_smartedit, release_config

LLM_PREFIX = "model.base_model.model."
UNET_PREFIX = "unet."
IGNORED_EMBED_COPY = LLM_PREFIX + "embed_tokens.weight"
ADAPTER = "default"  # PEFT's adapter name in the release's keys


def files(folder: str, step: Optional[int] = None, ext: Optional[str] = None) -> dict[str, str]:
  """The four files of one step of a release folder (the only step, unless `step` is given)."""
  steps = sorted(
      {int(m.group(1)) for d in os.listdir(folder) if (m := re.fullmatch(r"LLM-(\d+)", d))}
  )
  if not steps:
    raise FileNotFoundError(f"{folder} holds no LLM-<step> folder (not a SmartEdit release folder)")
  if step is None:
    if len(steps) > 1:
      raise ValueError(f"{folder} holds steps {steps}; pass step=")
    step = steps[0]

  def one(stem):
    found = [
        stem + e for e in ((ext,) if ext else (".safetensors", ".bin")) if os.path.exists(stem + e)
    ]
    if not found:
      raise FileNotFoundError(
          f"missing {os.path.relpath(stem, folder)}.safetensors or .bin in {folder}"
      )
    return found[0]

  j = os.path.join
  return {
      "llm": one(j(folder, f"LLM-{step}", "adapter_model")),
      "embeddings_qformer": one(
          j(folder, "embeddings_qformer", f"checkpoint-{step}_embeddings_qformer")
      ),
      "modulate": one(j(folder, f"modulate-{step}", "adapter_model")),
      "unet": one(j(folder, f"unet-{step}", "adapter_model")),
  }


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


def null_context(text_encoder, tokenizer) -> jax.Array:
  """CLIP's last hidden state of the empty prompt [1, 77, D]: the unconditional text branch."""
  from mre.pipeline import tokenize  # pylint: disable=import-outside-toplevel

  hidden, _ = text_encoder(tokenize(tokenizer, [""]))
  return hidden


def load_smartedit_pipeline(
    folder: str,
    *,
    clip: str,
    ip2p: str,
    llm_tokenizer: str,
    base_llm: Optional[str] = None,
    step: Optional[int] = None,
    reward: Optional[RewardConfig] = None,
    dtype=jnp.float32,
):
  """The whole editor: the release folder, the CLIP vision folder, an InstructPix2Pix (or SD 1.5)
  diffusers folder for the VAE, the CLIP text encoder (null context), tokenizer and scheduler, and
  the LLaMA tokenizer folder (transformers' AutoTokenizer, with the 35 tokens split by us)."""
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel

  from mre.model_io import diffusers_folder  # pylint: disable=import-outside-toplevel
  from mre.smartedit_editor import SmartEditPipeline  # pylint: disable=import-outside-toplevel

  model = load_smartedit_folder(
      folder, step=step, clip=clip, base_llm=base_llm, reward=reward, dtype=dtype
  )
  sub = lambda name: os.path.join(ip2p, name)  # noqa: E731
  text_encoder = diffusers_folder.load_text_encoder(sub("text_encoder"), dtype=dtype)
  tokenizer = diffusers_folder.load_tokenizer(sub("tokenizer"))
  tok = AutoTokenizer.from_pretrained(llm_tokenizer)
  with open(glob.glob(sub("scheduler/*.json"))[0]) as f:
    scheduler = json.load(f)
  return SmartEditPipeline(
      model=model,
      vae=diffusers_folder.load_vae(sub("vae"), dtype=dtype),
      null_context=null_context(text_encoder, tokenizer),
      encode=lambda text: tok(text, add_special_tokens=False).input_ids,
      scheduler_config=scheduler,
      text_encoder=text_encoder,
      tokenizer=tokenizer,
  )
