"""The SmartEdit-style editor's networks: an LLM reads the image and the instruction, 32 of its
hidden states condition the U-Net through the Q-Former and the bidirectional interaction module.

  CLIP ViT (layer -2, class token dropped) -> patches [B, 256, 1024] -> mm_projector -> spliced
  into the prompt in place of its first `<img_0>` -> LLaMA -> final-norm hidden states at the
  positions whose input token is an `<img_k>` (32 of them: teacher-forced in training, generated at
  inference) -> Q-Former (77 queries) -> BIM(Q-Former output, CLIP patches) -> the U-Net's context
  and a map added to its `conv_in` output.

`SmartEdit` holds the networks under the release's part names (`llm`, `vision_tower`,
`mm_projector`, `sd_qformer`, `bim`, `unet`); `ConditionedUNet` is the U-Net as the samplers call
it, the BIM map a keyword argument (and the reward condition too for a `RewardUNet`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from mre.models.bim import BIM, BIMConfig
from mre.models.clip_vision import CLIPVisionConfig, CLIPVisionModel, mm_projector, select_features
from mre.models.config import UNetConfig
from mre.models.llama import LlamaConfig, LlamaForCausalLM, generate
from mre.models.lora import LoRAConfig, apply_lora
from mre.models.qformer import QFormer, QFormerConfig, smartedit_config
from mre.models.reward_config import RewardConfig, RewardInputs
from mre.models.reward_unet import RewardUNet
from mre.models.smartedit_prompt import TokenIds
from mre.models.unet import UNet2DConditionModel

# OpenAI CLIP's pixel normalisation (CLIPImageProcessor of the LLaVA vision tower).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class SmartEditConfig:
  llm: LlamaConfig
  vision: CLIPVisionConfig
  qformer: QFormerConfig
  bim: BIMConfig
  unet: UNetConfig
  tokens: TokenIds = TokenIds()
  lora: Optional[LoRAConfig] = LoRAConfig(r=8, alpha=16.0, dropout=0.05)
  vision_layer: int = -2

  @property
  def num_patches(self) -> int:
    return self.vision.grid**2

  def check(self):
    """Refuses sizes that do not fit together, naming both sides."""
    pairs = [
        ("llm vocab_size", self.llm.vocab_size, "tokens.vocab_size", self.tokens.vocab_size),
        (
            "qformer encoder width",
            self.qformer.encoder_hidden_size,
            "llm width",
            self.llm.hidden_size,
        ),
        ("bim qformer_dim", self.bim.qformer_dim, "qformer width", self.qformer.hidden_size),
        ("bim width", self.bim.width, "vision width", self.vision.hidden_size),
        (
            "unet context width",
            self.unet.cross_attention_dim,
            "qformer width",
            self.qformer.hidden_size,
        ),
        (
            "bim conv_in_channels",
            self.bim.conv_in_channels,
            "unet channels",
            self.unet.block_out_channels[0],
        ),
    ]
    bad = [f"{a}={x} != {b}={y}" for a, x, b, y in pairs if x != y]
    if bad:
      raise ValueError("SmartEditConfig: " + "; ".join(bad))
    return self


def sd15_unet_dict(in_channels: int = 8) -> dict:
  """diffusers' config of SD 1.5's U-Net; 8 input channels as InstructPix2Pix/SmartEdit use it."""
  return {
      "in_channels": in_channels,
      "out_channels": 4,
      "block_out_channels": [320, 640, 1280, 1280],
      "layers_per_block": 2,
      "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
      "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
      "cross_attention_dim": 768,
      "attention_head_dim": 8,
      "norm_num_groups": 32,
  }


def release_config(size: str = "7b") -> SmartEditConfig:
  """The release's sizes: LLaVA-1.1 7B/13B (vocabulary 32035), CLIP ViT-L/14 at 224 px, the
  6-layer Q-Former, the BIM, SD 1.5's U-Net with 8 input channels."""
  widths = {"7b": (4096, 11008, 32, 32), "13b": (5120, 13824, 40, 40)}
  if size not in widths:
    raise ValueError(f"unknown SmartEdit size {size!r}; choose from {sorted(widths)}")
  hidden, ffn, layers, heads = widths[size]
  tokens = TokenIds()
  llm = LlamaConfig.from_dict(
      dict(
          model_type="llama",
          vocab_size=tokens.vocab_size,
          hidden_size=hidden,
          intermediate_size=ffn,
          num_hidden_layers=layers,
          num_attention_heads=heads,
          rms_norm_eps=1e-6,
          max_position_embeddings=2048,
          pad_token_id=0,
      )
  )
  vision = CLIPVisionConfig.from_dict(
      dict(
          hidden_size=1024,
          intermediate_size=4096,
          num_hidden_layers=24,
          num_attention_heads=16,
          image_size=224,
          patch_size=14,
      )
  )
  return SmartEditConfig(
      llm, vision, smartedit_config(hidden), BIMConfig(), UNetConfig.from_dict(sd15_unet_dict())
  ).check()


def tiny_config(
    *,
    vocab_words: int = 64,
    num_img: int = 4,
    latent_channels: int = 4,
    lora=LoRAConfig(r=2, alpha=4.0),
):
  """A SmartEdit small enough for a CPU test: every part a few layers of width <= 64."""
  tokens = TokenIds(
      img=vocab_words,
      im_start=vocab_words + 1,
      im_end=vocab_words + 2,
      first_img=vocab_words + 3,
      num_img=num_img,
  )
  llm = LlamaConfig.from_dict(
      dict(
          vocab_size=tokens.vocab_size,
          hidden_size=32,
          intermediate_size=64,
          num_hidden_layers=2,
          num_attention_heads=4,
          num_key_value_heads=2,
          max_position_embeddings=512,
          pad_token_id=0,
      )
  )
  vision = CLIPVisionConfig.from_dict(
      dict(
          hidden_size=32,
          intermediate_size=64,
          num_hidden_layers=3,
          num_attention_heads=4,
          image_size=16,
          patch_size=4,
      )
  )
  qformer = smartedit_config(
      32,
      hidden_size=24,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=48,
      num_query_tokens=6,
  )
  bim = BIMConfig(qformer_dim=24, width=32, depth=2, heads=4, mlp_dim=48, conv_in_channels=16)
  unet = UNetConfig.from_dict(
      dict(
          in_channels=2 * latent_channels,
          out_channels=latent_channels,
          block_out_channels=[16, 32],
          layers_per_block=1,
          down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
          up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
          cross_attention_dim=24,
          attention_head_dim=4,
          norm_num_groups=8,
      )
  )
  return SmartEditConfig(llm, vision, qformer, bim, unet, tokens, lora).check()


def splice_image(embed, ids, mask, patches, placeholder: int, fill_id: int = -1):
  """The prompt with its first `placeholder` token replaced by the N patch embeddings.

  `embed`: the LLM's token embedding; ids, mask [B, T]; patches [B, N, D]. Returns
  (inputs_embeds [B, T-1+N, D], mask [B, T-1+N], ids [B, T-1+N] with `fill_id` at the patches).
  Each row is spliced at its own placeholder, so left and right padding both stay in place."""
  b, t = ids.shape
  n = patches.shape[1]
  p = jnp.argmax(ids == placeholder, axis=1)[:, None]
  j = jnp.arange(t - 1 + n)[None]
  at_image = (j >= p) & (j < p + n)
  src = jnp.clip(jnp.where(j < p, j, j - n + 1), 0, t - 1)
  tok = jnp.take_along_axis(ids, src, axis=1)
  img = jnp.take_along_axis(patches, jnp.clip(j - p, 0, n - 1)[..., None], axis=1)
  emb = embed(tok)
  emb = jnp.where(at_image[..., None], img.astype(emb.dtype), emb)
  new_mask = at_image | jnp.take_along_axis(mask.astype(bool), src, axis=1)
  return emb, new_mask, jnp.where(at_image, fill_id, tok)


def img_positions(ids, tokens: TokenIds):
  """Positions [B, num_img] of the first num_img `<img_k>` inputs per row, and their count [B]."""
  is_img = ids >= tokens.first_img
  order = jnp.argsort(jnp.where(is_img, 0, 1), axis=1, stable=True)[:, : tokens.num_img]
  return order, is_img.sum(axis=1)


class ConditionedUNet(nnx.Module):
  """The U-Net as the samplers call it: `(sample, timesteps, context, *, conv_in_residual,
  reward=None)`; the BIM map is added to the `conv_in` output (before a reward's latent injection).
  """

  def __init__(self, unet: UNet2DConditionModel):
    self.unet = unet

  @property
  def config(self):
    """The U-Net's config: `denoiser` (the samplers, the loss) reads its source skip from it."""
    return self.unet.config

  def __call__(
      self, sample, timesteps, context, *, conv_in_residual, reward: Optional[RewardInputs] = None
  ):
    unet = self.unet
    if isinstance(unet, RewardUNet) != (reward is not None):
      raise ValueError("a RewardUNet needs reward=, a plain U-Net takes none")
    add = lambda h: h + conv_in_residual.astype(h.dtype)  # noqa: E731
    extra, after = None, add
    if reward is not None:
      extra, reward_after = unet.reward_injections(reward)
      if reward_after is not None:
        after = lambda h: reward_after(add(h))  # noqa: E731
    return UNet2DConditionModel.__call__(
        unet, sample, timesteps, context, extra_time_emb=extra, after_conv_in=after
    )


PARTS = ("llm", "vision_tower", "mm_projector", "sd_qformer", "bim", "unet")


def build_part(
    name: str,
    cfg: SmartEditConfig,
    *,
    reward=None,
    remat=False,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs,
):
  """One part of `SmartEdit` (the LLM with its LoRA adapters)."""
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  layer = ("layer",) if remat else ()
  if name == "llm":
    llm = LlamaForCausalLM(cfg.llm, remat=layer, rngs=rngs, **kw)
    if cfg.lora is not None:
      apply_lora(llm, cfg.lora, rngs=rngs)
    return llm
  if name == "vision_tower":
    return CLIPVisionModel(cfg.vision, remat=layer, rngs=rngs, **kw)
  if name == "mm_projector":
    return mm_projector(cfg.vision.hidden_size, cfg.llm.hidden_size, rngs=rngs, **kw)
  if name == "sd_qformer":
    return QFormer(cfg.qformer, remat=layer, rngs=rngs, **kw)
  if name == "bim":
    return BIM(cfg.bim, remat=remat, rngs=rngs, **kw)
  if name == "unet":
    unet_remat = ("resnet", "transformer") if remat else ()
    if reward is None:
      return UNet2DConditionModel(cfg.unet, remat=unet_remat, rngs=rngs, **kw)
    return RewardUNet(cfg.unet, reward, remat=unet_remat, rngs=rngs, **kw)
  raise ValueError(f"unknown SmartEdit part {name!r}; parts: {PARTS}")


class SmartEdit(nnx.Module):
  """The networks of a SmartEdit-style editor (the VAE and the null text context are the
  pipeline's). `reward` makes the U-Net a `RewardUNet` (the paper's multi-reward on top).
  `parts` (name -> module) are taken as they are: what `abstract_smartedit` builds."""

  def __init__(
      self,
      config: SmartEditConfig,
      *,
      reward: Optional[RewardConfig] = None,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      remat: bool = False,
      rngs: Optional[nnx.Rngs] = None,
      parts: Optional[dict] = None,
  ):
    self.config = config.check()
    parts = dict(parts or {})
    for name in PARTS:
      if name not in parts:
        parts[name] = build_part(
            name,
            config,
            reward=reward,
            remat=remat,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )
    self.llm, self.vision_tower, self.mm_projector = (
        parts["llm"],
        parts["vision_tower"],
        parts["mm_projector"],
    )
    self.sd_qformer, self.bim, self.unet = parts["sd_qformer"], parts["bim"], parts["unet"]

  def image_features(self, clip_pixels):
    """CLIP patch features [B, N, vision width] of normalised pixels [B, 224, 224, 3]."""
    hidden, _ = self.vision_tower(clip_pixels)
    return select_features(hidden, self.config.vision_layer)

  def llm_inputs(self, patches, ids, mask):
    """(inputs_embeds, mask, ids) of the prompt with the projected patches spliced in."""
    embed = self.llm.model.embed_tokens
    return splice_image(embed, ids, mask, self.mm_projector(patches), self.config.tokens.first_img)

  def teacher_forced(self, patches, ids, mask):
    """Training: the whole conversation (answer included) in one pass. Returns (states
    [B, num_img, width], logits [B, T', vocab], spliced ids [B, T'], count [B] of `<img_k>`)."""
    emb, m, sids = self.llm_inputs(patches, ids, mask)
    out = self.llm(attention_mask=m, inputs_embeds=emb)
    pos, count = img_positions(jnp.where(m, sids, -1), self.config.tokens)
    return jnp.take_along_axis(out.hidden_states, pos[..., None], axis=1), out.logits, sids, count

  def generated(self, patches, ids, mask, *, max_new_tokens=64, temperature=0.0, key=None):
    """Inference: the answer generated from left-padded prompts, stopping at `</s>` or at the last
    `<img_k>` (whose state completes the set). Returns (states [B, num_img, width], tokens
    [B, max_new_tokens], count [B] of `<img_k>` generated: a row with fewer has unusable states)."""
    tok = self.config.tokens
    emb, m, _ = self.llm_inputs(patches, ids, mask)
    gen = generate(
        self.llm,
        attention_mask=m,
        inputs_embeds=emb,
        max_new_tokens=max_new_tokens,
        eos_token_id=(tok.eos, tok.first_img + tok.num_img - 1),
        pad_token_id=0,
        temperature=temperature,
        key=key,
    )
    pos, count = img_positions(gen.tokens, tok)
    return jnp.take_along_axis(gen.hidden_states, pos[..., None], axis=1), gen.tokens, count

  def condition(self, states, patches, latent_size):
    """(U-Net context [B, 77, 768], conv_in residual [B, h, w, 320]) from the LLM states."""
    return self.bim(self.sd_qformer(states), patches, latent_size)


def abstract_smartedit(
    config: SmartEditConfig, *, reward=None, remat=False, dtype=jnp.float32, param_dtype=jnp.float32
) -> SmartEdit:
  """A `SmartEdit` of shapes only, each part traced on its own (one trace of the whole 7B model
  takes minutes: flax's RNG counter makes tracing quadratic in its length)."""
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  parts = {
      name: nnx.eval_shape(
          lambda name=name, seed=i: build_part(
              name, config, reward=reward, remat=remat, rngs=nnx.Rngs(seed), **kw
          )
      )
      for i, name in enumerate(PARTS)
  }
  return SmartEdit(config, reward=reward, remat=remat, parts=parts, **kw)


def clip_pixels(images, size: int):
  """Images [B, H, W, 3] in [-1, 1] -> CLIP's normalised input [B, size, size, 3] (bicubic)."""
  x = jax.image.resize(images.astype(jnp.float32), (images.shape[0], size, size, 3), "bicubic")
  x = jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)
  return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def release_condition_dropout(key, context, null_context, image_latents, p: float = 0.05):
  """The release's conditioning dropout: one draw r per sample; the context becomes the empty
  prompt's CLIP context when r < 2p, the source latents zeros when p <= r < 3p (the BIM map is
  never dropped)."""
  r = jax.random.uniform(key, (context.shape[0],))
  text = jnp.where((r < 2 * p)[:, None, None], null_context.astype(context.dtype), context)
  keep = ~((r >= p) & (r < 3 * p))
  return text, image_latents * keep[:, None, None, None].astype(image_latents.dtype)
