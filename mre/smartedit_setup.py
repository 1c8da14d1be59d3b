"""The SmartEdit-style editor a training config asks for (`model.family='smartedit'`), and its export.

Only the toy is trainable (`model.smartedit.size='toy'`, `configs/smartedit.py:toy`): every network
from scratch in the toy world, in pixel space.

- LLM tokenizer: one id per word (`write_llm_word_tokenizer`) over the toy vocabulary and the words
  of the release's conversation and template, standing in for LLaMA's; the 35 added tokens follow
  it (`TokenIds(img=len(tokenizer))`). It is written to the workdir and read back with
  `AutoTokenizer`, as `load_smartedit_pipeline` reads the exported one, so training and editing
  tokenise alike.
- LLaMA, CLIP ViT, Q-Former, BIM: `tiny_config`'s sizes; the answer has all 32 `<img_k>` tokens
  (`model.smartedit.num_img_tokens`); the Q-Former has as many queries as the CLIP text context
  has tokens (the null context and the Q-Former context take the same guidance branches) and the
  CLIP text width (the U-Net's context width).
- U-Net and CLIP text encoder: the toy InstructPix2Pix editor's (`model_setup.scratch_models`: the
  `model.scratch` sizes and options, source skip and pixel head included); the text encoder is
  random and frozen, its output for "" is the null context (the release's is pretrained CLIP's).
  With `model.pretrained` (a trained toy InstructPix2Pix folder, e.g. the replication's stage 1)
  the U-Net, text encoder and tokenizer are that editor's, as the release starts its U-Net from
  InstructPix2Pix's; the LLM, ViT, Q-Former and BIM still start from random weights.
- Multi-reward (`model.reward.enabled`, the SmartEdit row of the paper): the U-Net becomes a
  `RewardUNet` (`reward_unet_from_stage1`: every U-Net weight kept, the reward modules new); the
  failure texts are pooled by the frozen CLIP text encoder.

The release sizes (7B/13B) train from a SmartEdit folder (`model.pretrained`; loading and export:
mre/smartedit_release.py); without one they are refused with a message (the release's own start,
LLaVA + an InstructDiffusion U-Net, is not built; `python -m mre.smartedit_dryrun` gives the sizes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

from flax import nnx

from mre import model_setup
from mre.model_io import clip_vision_weights, diffusers_folder
from mre.model_io import smartedit_folder as sf
from mre.model_io.word_tokenizer import llm_words, write_llm_word_tokenizer
from mre.models.config import UNetConfig
from mre.models.qformer import smartedit_config as qformer_config
from mre.models.reward_unet import RewardUNet, reward_unet_from_stage1
from mre.models.smartedit import SmartEdit, SmartEditConfig, tiny_config
from mre.models.smartedit_prompt import IM_END, IM_START, IMG, TEMPLATE, conversation
from mre.smartedit_dryrun import smartedit_config as dryrun_config
from mre.smartedit_editor import SmartEditPipeline


def refusal(config) -> str | None:
  """Why `config` cannot be trained (None when it can): the release sizes and the options the
  SmartEdit trainer does not implement."""
  s, t = config.model.smartedit, config.train
  if s.size != "toy" and not config.model.pretrained:
    return (
        f"the release-size SmartEdit (model.smartedit.size={s.size!r}) trains from a SmartEdit "
        "folder: set model.pretrained to a release or editor folder (and model.smartedit.clip, "
        "ip2p, llm_tokenizer where it has no smartedit.json naming them). Starting from LLaVA "
        "and an InstructDiffusion U-Net, as the release does, is not built. Sizes and memory: "
        "python -m mre.smartedit_dryrun --config=configs/smartedit.py; the toy trains from "
        "scratch: --config=configs/smartedit.py:toy"
    )
  if s.size != "toy" and s.align_steps:
    return (
        f"model.smartedit.align_steps={s.align_steps}: the alignment stage is the toy's (a "
        "SmartEdit folder's Q-Former is aligned already); set it to 0"
    )
  problems = []
  ignored = {  # loss options of the InstructPix2Pix step the SmartEdit step does not have
      "train.loss": (t.loss, "mse"),
      "train.snr_gamma": (t.snr_gamma, 0.0),
      "train.edit_dilation": (t.edit_dilation, 0),
      "train.edit_smoothing": (t.edit_smoothing, 1),
      "train.edit_region_share": (t.get("edit_region_share", 0.0), 0.0),
      "train.edit_balance": (t.get("edit_balance", 0.0), 0.0),
      "train.rollout_prob": (t.get("rollout_prob", 0.0), 0.0),
  }
  problems += [f"{k}={v!r}" for k, (v, default) in ignored.items() if v != default]
  if s.edit_align_loss_weight < 0:
    problems.append(f"model.smartedit.edit_align_loss_weight={s.edit_align_loss_weight} (< 0)")
  if t.grad_accum < 1:
    problems.append(f"train.grad_accum={t.grad_accum} (< 1)")
  if t.ema_decay:
    problems.append(f"train.ema_decay={t.ema_decay} (no EMA, as the release)")
  if config.data.precompute_latents:
    problems.append("data.precompute_latents (pixel space has no latents to cache)")
  if problems:
    return "the SmartEdit trainer does not take " + "; ".join(problems)
  return None


def _plain_text(text: str) -> str:
  """`text` with the added tokens and `</s>` cut out, as `smartedit_prompt.tokenize` cuts them."""
  specials = [IMG, IM_START, IM_END, "</s>", r"<img_\d+>"]
  return re.sub("|".join(s if s.startswith("<img_") else re.escape(s) for s in specials), " ", text)


def llm_vocabulary(vocab_words, num_img: int) -> list[str]:
  """The toy LLM tokenizer's words: the conversation's and template's, then the dataset's."""
  texts = [_plain_text(conversation(" ".join(vocab_words), answer=True, num_img=num_img))]
  return llm_words(texts + list(vocab_words))


def toy_config(config, vocab_size: int, context_tokens: int) -> SmartEditConfig:
  """The toy `SmartEditConfig`: `tiny_config`'s LLM, ViT and BIM, the Q-Former and U-Net fitted to
  the toy CLIP text context (`context_tokens` x `model.scratch.text_hidden`)."""
  s, sc = config.model.smartedit, config.model.scratch
  base = tiny_config(
      vocab_words=vocab_size,
      num_img=s.num_img_tokens,
      latent_channels=3,
      lora=dryrun_config(config).lora,  # the configured r, alpha, dropout, targets
  )
  width = sc.text_hidden
  qformer = qformer_config(
      base.llm.hidden_size,
      hidden_size=width,
      num_hidden_layers=base.qformer.num_hidden_layers,
      num_attention_heads=base.qformer.num_attention_heads,
      intermediate_size=2 * width,
      num_query_tokens=context_tokens,
  )
  bim = dataclasses.replace(base.bim, qformer_dim=width, conv_in_channels=sc.unet_channels[0])
  unet = UNetConfig.from_dict(model_setup.scratch_unet_config(config, 3, width))
  return dataclasses.replace(base, qformer=qformer, bim=bim, unet=unet).check()


@dataclasses.dataclass
class ToySmartEdit:
  """The toy editor and the tokenizer folders its export copies."""

  pipe: SmartEditPipeline
  llm_tokenizer_dir: str
  clip_tokenizer_dir: str


def _pretrained_ip2p(config, scratch_unet_config: dict):
  """(the pipeline, its tokenizer folder) of the toy InstructPix2Pix editor in `model.pretrained`;
  its U-Net must have the `model.scratch` config (the SmartEdit's sizes)."""
  from mre.model_io.folders import load_any  # pylint: disable=import-outside-toplevel

  folder = config.model.pretrained
  pipe = load_any(folder)
  if isinstance(pipe.unet, RewardUNet):
    raise ValueError(f"{folder} holds a reward-conditioned U-Net; start from a stage-1 editor")
  have = dataclasses.asdict(pipe.unet.config)
  want = dataclasses.asdict(UNetConfig.from_dict(scratch_unet_config))
  diff = sorted(k for k in want if have.get(k) != want[k])
  if diff:
    raise ValueError(
        f"the U-Net in {folder} differs from model.scratch's in "
        + ", ".join(f"{k} ({have.get(k)!r} there, {want[k]!r} here)" for k in diff)
        + "; set model.scratch to the folder's sizes"
    )
  tokenizer_dir = os.path.join(folder, "tokenizer")
  if not os.path.isdir(tokenizer_dir):
    raise FileNotFoundError(f"{folder} has no tokenizer/ folder to copy into the export")
  return pipe, tokenizer_dir


def build_toy(config, vocab_words, workdir: str) -> ToySmartEdit:
  """The toy SmartEdit with random weights (seeded by `config.seed`; with `model.pretrained`,
  the U-Net, CLIP text encoder and tokenizer of that toy InstructPix2Pix editor), its tokenizers
  written to `workdir/llm_tokenizer` and `workdir/tokenizer`."""
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel

  if vocab_words is None:
    raise ValueError("the toy SmartEdit needs the dataset's vocabulary; only the toy world has one")
  llm_dir = write_llm_word_tokenizer(
      os.path.join(workdir, "llm_tokenizer"),
      llm_vocabulary(vocab_words, config.model.smartedit.num_img_tokens),
  )
  llm_tok = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)
  clip_dir = os.path.join(workdir, "tokenizer")
  scratch = model_setup.scratch_models(config, vocab_words, clip_dir)
  clip_tok, scheduler = scratch.pipe.tokenizer, scratch.pipe.scheduler_config
  if config.model.pretrained:
    unet_config = model_setup.scratch_unet_config(config, 3, config.model.scratch.text_hidden)
    ip2p, clip_dir = _pretrained_ip2p(config, unet_config)
    unet, text_encoder, clip_tok = ip2p.unet, ip2p.text_encoder, ip2p.tokenizer
    scheduler = model_setup.apply_scheduler_settings(
        config, ip2p.scheduler_config, config.model.pretrained
    )
  else:
    unet = scratch.makers["unet"]()
    text_encoder = scratch.makers["text_encoder"]()
  cfg = toy_config(config, len(llm_tok), clip_tok.model_max_length)
  reward = model_setup.reward_config(config)
  if reward is not None:  # the stage-1 weights kept, the reward modules new (as stage 2's)
    unet = reward_unet_from_stage1(unet, reward, seed=config.seed)
  model = SmartEdit(cfg, rngs=nnx.Rngs(config.seed + 2), parts={"unet": unet})
  pipe = SmartEditPipeline(
      model=model,
      vae=scratch.pipe.vae,
      null_context=sf.null_context(text_encoder, clip_tok),
      encode=lambda text: llm_tok(text, add_special_tokens=False).input_ids,
      scheduler_config=scheduler,
      text_encoder=text_encoder,
      tokenizer=clip_tok,
      template=TEMPLATE,
  )
  return ToySmartEdit(pipe, llm_dir, clip_dir)


def export_editor(toy: ToySmartEdit, folder: str, step: int) -> str:
  """An editor folder `mre.edit --model` and `mre.eval --model` open: the release layout at `step`
  plus smartedit.json naming the folders written inside it (`clip/`: the vision tower; `ip2p/`:
  pixel space, the frozen CLIP text encoder, its tokenizer, the scheduler; `llm_tokenizer/`)."""
  pipe, model = toy.pipe, toy.pipe.model
  if os.path.isdir(folder):  # a rerun's export replaces the old one whole (no stale steps)
    shutil.rmtree(folder)
  sf.save_smartedit_folder(model, folder, step)
  clip_vision_weights.save_clip_vision_folder(model.vision_tower, os.path.join(folder, "clip"))
  ip2p = os.path.join(folder, "ip2p")
  diffusers_folder.save_vae(pipe.vae, os.path.join(ip2p, "vae"))
  diffusers_folder.save_text_encoder(pipe.text_encoder, os.path.join(ip2p, "text_encoder"))
  shutil.copytree(toy.clip_tokenizer_dir, os.path.join(ip2p, "tokenizer"))
  os.makedirs(os.path.join(ip2p, "scheduler"))
  with open(os.path.join(ip2p, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(pipe.scheduler_config, f, indent=2)
  shutil.copytree(toy.llm_tokenizer_dir, os.path.join(folder, "llm_tokenizer"))
  sf.write_editor_json(
      folder, model=model, clip="clip", ip2p="ip2p", llm_tokenizer="llm_tokenizer", step=step
  )
  return folder


__all__ = ["ToySmartEdit", "build_toy", "export_editor", "llm_vocabulary", "refusal", "toy_config"]
