"""Tiny SmartEdit models and folders for the tests: a random model whose LLM always answers the
`<img_k>` chain, a character tokenizer standing in for LLaMA's, and a whole editor folder on disk
(the release's files, a CLIP vision folder, the diffusers parts, the tokenizer, smartedit.json)."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mre.model_io import clip_vision_weights, diffusers_folder
from mre.model_io import smartedit_folder as sf
from mre.model_io.torch_state_dict import materialize_non_params
from mre.model_io.word_tokenizer import write_word_tokenizer
from mre.models import smartedit as se
from mre.models.bim import BIM
from mre.models.clip_text import CLIPTextModel
from mre.models.vae import AutoencoderKL

# A template whose answer is just the <img_k> tokens, so a forced chain of tokens is the answer.
TEMPLATE = ("[cap]", " [img].")
WORDS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ :\"'.,?"
UNK, BOS, EOS = "<unk>", "<s>", "</s>"


def encode(text):
  """A character tokenizer (ids 3..) standing in for LLaMA's."""
  return [3 + WORDS.index(c) for c in text if c in WORDS]


LAST = encode(":")[0]  # the prompt's last token ("ASSISTANT:")


def _fill(module, rng, scale=0.2):
  """Random values for every parameter, from numpy (fast: no per-op compilation); norm scales
  near 1."""
  for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    shape = var.get_value().shape
    value = (
        1 + 0.1 * rng.normal(size=shape) if path[-1] == "scale" else scale * rng.normal(size=shape)
    )
    var.set_value(jnp.asarray(value, jnp.float32))
  return module


def rigged_model(seed=0, config=None, reward=None):
  """Random weights, the BIM freshly initialised (its heads zero), and an LLM that answers
  `<img_0> ... <img_{n-1}>` after `:` whatever the context: those tokens' embeddings dominate the
  residual stream and lm_head maps each to the next one. Default config: `tiny_config` with 3
  latent channels (a `PixelSpace` VAE)."""
  cfg = config or se.tiny_config(vocab_words=64, latent_channels=3)
  model = se.abstract_smartedit(cfg, reward=reward)
  rng = np.random.default_rng(seed)
  for part in ("llm", "vision_tower", "mm_projector", "sd_qformer", "unet"):
    _fill(getattr(model, part), rng)
  model.bim = BIM(cfg.bim, rngs=nnx.Rngs(seed))
  materialize_non_params(model)
  tok = cfg.tokens
  chain = [LAST] + [tok.first_img + k for k in range(tok.num_img)]
  basis = np.linalg.qr(rng.normal(size=(cfg.llm.hidden_size, len(chain))))[0].T
  embed = np.array(model.llm.model.embed_tokens.embedding.get_value())
  head = np.array(model.llm.lm_head.kernel.get_value())
  for i, t in enumerate(chain):
    embed[t] = 20 * basis[i]
    if i + 1 < len(chain):
      head[:, chain[i + 1]] += 50 * basis[i]
  model.llm.model.embed_tokens.embedding.set_value(jnp.asarray(embed))
  model.llm.lm_head.kernel.set_value(jnp.asarray(head))
  return model


def editor_config():
  """`tiny_config` for a whole editor: 4 latent channels (an AutoencoderKL) and 77 Q-Former
  queries (the CLIP text context's length, as the null context has it)."""
  cfg = se.tiny_config(vocab_words=64, latent_channels=4)
  q = cfg.qformer
  qformer = se.smartedit_config(
      cfg.llm.hidden_size,
      hidden_size=q.hidden_size,
      num_hidden_layers=q.num_hidden_layers,
      num_attention_heads=q.num_attention_heads,
      intermediate_size=q.intermediate_size,
      num_query_tokens=77,
  )
  return dataclasses.replace(cfg, qformer=qformer).check()


def write_llm_tokenizer(folder):
  """A transformers tokenizer folder (AutoTokenizer opens it offline) whose ids are `encode`'s."""
  from tokenizers import Tokenizer, models
  from transformers import PreTrainedTokenizerFast

  vocab = {UNK: 0, BOS: 1, EOS: 2, **{c: 3 + i for i, c in enumerate(WORDS)}}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK)
  fast.save_pretrained(folder)
  return folder


def write_diffusers_parts(folder, *, text_width, latent_channels, seed=0):
  """The parts of an InstructPix2Pix folder a SmartEdit editor reads: a random VAE and CLIP text
  encoder (ours, written in diffusers' layout), a CLIP tokenizer (77 tokens), a scheduler config."""
  rng = np.random.default_rng(seed)
  build = lambda cls, cfg: materialize_non_params(  # noqa: E731
      _fill(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))), rng, 0.05)
  )
  vae = build(
      AutoencoderKL,
      dict(
          in_channels=3,
          out_channels=3,
          latent_channels=latent_channels,
          block_out_channels=[16, 32],
          layers_per_block=1,
          norm_num_groups=8,
      ),
  )
  tokenizer = write_word_tokenizer(
      os.path.join(folder, "tokenizer"), ["make", "it", "red", "blue", "darker"]
  )
  with open(os.path.join(tokenizer, "vocab.json")) as f:
    vocab_size = len(json.load(f))
  text = build(
      CLIPTextModel,
      dict(
          vocab_size=vocab_size,
          hidden_size=text_width,
          intermediate_size=2 * text_width,
          num_hidden_layers=1,
          num_attention_heads=4,
          max_position_embeddings=77,
          eos_token_id=vocab_size - 1,
      ),
  )
  diffusers_folder.save_vae(vae, os.path.join(folder, "vae"))
  diffusers_folder.save_text_encoder(text, os.path.join(folder, "text_encoder"))
  os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
  with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump(
        {
            "_class_name": "EulerAncestralDiscreteScheduler",
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "steps_offset": 1,
            "prediction_type": "epsilon",
        },
        f,
    )
  return folder


def write_editor_folder(root, model, *, step=5, json_entries=("clip", "ip2p", "llm_tokenizer")):
  """An editor folder `root/smartedit` (release files of `step` + smartedit.json holding the
  entries named, paths relative to it) next to `root/clip`, `root/ip2p` and `root/llm`."""
  root = str(root)
  cfg = model.config
  clip_vision_weights.save_clip_vision_folder(model.vision_tower, os.path.join(root, "clip"))
  write_diffusers_parts(
      os.path.join(root, "ip2p"),
      text_width=cfg.unet.cross_attention_dim,
      latent_channels=cfg.unet.out_channels,
  )
  write_llm_tokenizer(os.path.join(root, "llm"))
  folder = os.path.join(root, "smartedit")
  sf.save_smartedit_folder(model, folder, step)
  paths = {"clip": "../clip", "ip2p": "../ip2p", "llm_tokenizer": "../llm"}
  sf.write_editor_json(folder, model=model, **{k: paths[k] for k in json_entries})
  return folder
