"""Editing with a SmartEdit-style model: image + instruction -> LLM states -> guided sampling.

`SmartEditor` is used like `mre.editor.Editor` (`edit_arrays` on float arrays, `edit` on PIL images,
same `EditSettings` plus the LLM's sampling settings). As in the release's inference:
- the LLM generates the answer (temperature 0.7 by default) from the image and the instruction;
  the states at its 32 `<img_k>` tokens go through the Q-Former and the BIM;
- InstructPix2Pix's three-branch guidance: the BIM context with the image latents, the null context
  with the image latents, the null context with zero latents; the null context is the CLIP text
  encoder's output for the empty prompt (the InstructPix2Pix pipeline's `negative_prompt_embeds`);
  the BIM's `conv_in` map is the same in all three branches;
- with a `RewardUNet`, the reward condition goes to every branch too (the paper's SmartEdit row).
`editor_for` picks `SmartEditor` or `Editor` by what was loaded (what `mre.edit` and `mre.eval` do).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mre.diffusion import schedule_from_config
from mre.editor import EditSettings, Editor, edit_images, edit_sampler
from mre.models.reward_config import NULL_TEXT, RewardInputs
from mre.models.reward_unet import RewardUNet
from mre.models.smartedit import ConditionedUNet, SmartEdit, clip_pixels
from mre.models.smartedit_prompt import TEMPLATE, prompt_batch
from mre.pipeline import tokenize


@dataclasses.dataclass
class SmartEditPipeline:
  """The pieces of a SmartEdit-style editor. `encode`: the LLM's tokenizer, text -> ids without
  BOS. `null_context`: CLIP's last hidden state of the empty prompt [1, 77, 768]. The CLIP text
  encoder and tokenizer are needed only for reward texts."""

  model: SmartEdit
  vae: Any
  null_context: Any
  encode: Callable[[str], Sequence[int]]
  scheduler_config: dict
  text_encoder: Any = None
  tokenizer: Any = None
  template: tuple = TEMPLATE

  @property
  def unet(self):
    """The U-Net, where a `Pipeline` has it (its `reward_config` for a reward model)."""
    return self.model.unet


@dataclasses.dataclass(frozen=True)
class SmartEditSettings(EditSettings):
  temperature: float = 0.7  # the release's LLM sampling temperature (0: greedy)
  max_new_tokens: int = 96  # answer budget; generation stops at the last <img_k> or </s>


class SmartEditor:
  """Edits batches of same-sized images; compiled once per (batch, size, prompt length)."""

  def __init__(self, pipe: SmartEditPipeline, settings: SmartEditSettings = SmartEditSettings()):
    self.pipe, self.settings = pipe, settings
    for module in (pipe.model, pipe.vae):
      module.eval()
    self.model = pipe.model
    self.unet = ConditionedUNet(pipe.model.unet)
    self.is_reward = isinstance(pipe.model.unet, RewardUNet)
    if settings.reward_scale is not None and not self.is_reward:
      raise ValueError("reward guidance (reward_scale) needs a reward-conditioned model")
    self.schedule = schedule_from_config(pipe.scheduler_config)
    self._sample = edit_sampler(self.schedule, settings, pipe.vae.config.latent_channels)
    size = self.model.config.vision.image_size
    self._patches = nnx.jit(lambda m, x: m.image_features(clip_pixels(x, size)))
    self._generate = nnx.jit(
        lambda m, p, ids, mask, t, key, n: m.generated(
            p, ids, mask, max_new_tokens=n, temperature=t, key=key
        ),
        static_argnums=(6,),
    )
    self._condition = nnx.jit(lambda m, s, p, hw: m.condition(s, p, hw), static_argnums=(3,))
    self._encode_text = nnx.jit(lambda te, ids: te(ids))
    self._encode_image = nnx.jit(lambda vae, x: vae.encode(x).mode())
    self._decode = nnx.jit(lambda vae, z: vae.decode(vae.unscale_latents(z)))
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    self.multiple = vae_factor * 2 ** (len(self.model.config.unet.block_out_channels) - 1)

  def conditioning(self, images, instructions: Sequence[str], key=None):
    """(context [B, Q, D], conv_in residual [B, h, w, C], generated tokens [B, N]) for images
    [B, H, W, 3] in [-1, 1]; refuses a row whose answer lacks some `<img_k>` (as the release)."""
    tokens = self.model.config.tokens
    batch = prompt_batch(
        instructions, self.pipe.encode, answer=False, ids=tokens, template=self.pipe.template
    )
    patches = self._patches(self.model, jnp.asarray(images))
    key = jax.random.key(self.settings.seed) if key is None else key
    states, generated, count = self._generate(
        self.model,
        patches,
        jnp.asarray(batch.input_ids),
        jnp.asarray(batch.attention_mask),
        jnp.float32(self.settings.temperature),
        key,
        int(self.settings.max_new_tokens),
    )
    short = [i for i, c in enumerate(np.asarray(count)) if c < tokens.num_img]
    if short:
      raise ValueError(
          f"the LLM answered without all {tokens.num_img} <img_k> tokens for instruction(s) "
          f"{[instructions[i] for i in short]} (within max_new_tokens={self.settings.max_new_tokens})"
      )
    factor = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
    hw = (images.shape[1] // factor, images.shape[2] // factor)
    context, residual = self._condition(self.model, states, patches, hw)
    return context, residual, generated

  def reward_inputs(self, batch: int, scores=None, texts=None) -> RewardInputs:
    """The reward condition (default: the settings' reward), pooled by the CLIP text encoder."""
    form = self.model.unet.reward_config
    scores = self.settings.reward_scores if scores is None else scores
    texts = texts or self.settings.reward_texts or form.perfect_texts
    if len(scores) != 3 or len(texts) != 3:
      raise ValueError(f"a reward is 3 scores and 3 texts, got {scores} and {texts}")
    ids = tokenize(self.pipe.tokenizer, form.slot_texts(texts))
    _, pooled = self._encode_text(self.pipe.text_encoder, ids)
    return RewardInputs(
        jnp.broadcast_to(jnp.asarray(scores, jnp.float32), (batch, 3)),
        jnp.broadcast_to(pooled[None], (batch,) + pooled.shape),
    )

  def edit_arrays(
      self,
      images: np.ndarray,
      instructions: Sequence[str],
      *,
      key=None,
      noise=None,
      reward: Optional[RewardInputs] = None,
  ) -> np.ndarray:
    """Float images [B, H, W, 3] in [-1, 1] (H, W valid sizes) -> edited images in [-1, 1]."""
    if len(images) != len(instructions) or any(not (t and t.strip()) for t in instructions):
      raise ValueError("every image needs one non-empty instruction")
    b = images.shape[0]
    key = jax.random.key(self.settings.seed) if key is None else key
    key_llm, key_sample = jax.random.split(key)
    context, residual, _ = self.conditioning(images, instructions, key_llm)
    image_latents = self._encode_image(self.pipe.vae, jnp.asarray(images))
    extra = {"conv_in_residual": residual}
    extra_uncond = None
    if self.is_reward:
      extra["reward"] = reward if reward is not None else self.reward_inputs(b)
      if self.settings.reward_negative_scores is not None:  # guidance away from a low reward
        texts = self.settings.negative_texts(self.model.unet.reward_config.perfect_texts)
        away = self.reward_inputs(b, scores=self.settings.reward_negative_scores, texts=texts)
        extra_uncond = {"conv_in_residual": residual, "reward": away}
      elif self.settings.reward_scale is not None:
        ids = tokenize(self.pipe.tokenizer, [NULL_TEXT])
        _, pooled = self._encode_text(self.pipe.text_encoder, ids)
        null = self.model.unet.reward_config.null_reward(pooled, b)
        extra_uncond = {"conv_in_residual": residual, "reward": null}
    latents = self._sample(
        self.unet,
        image_latents,
        context,
        jnp.asarray(self.pipe.null_context),
        key=None if noise is not None else key_sample,
        noise=noise,
        extra_cond=extra,
        extra_cond_uncond=extra_uncond,
    )
    return np.asarray(self._decode(self.pipe.vae, latents), np.float32)

  def edit(
      self,
      images,
      instructions: Sequence[str],
      *,
      batch_size=8,
      reward: Optional[RewardInputs] = None,
      progress=None,
  ):
    """PIL images + instructions -> edited PIL images, as `Editor.edit` (`edit_images`)."""
    return edit_images(
        self, images, instructions, batch_size=batch_size, reward=reward, progress=progress
    )


def editor_for(pipe, settings: EditSettings, *, temperature=0.7, max_new_tokens=96):
  """The editor of what was loaded (`mre.model_io.folders.load_for_editing`): a `SmartEditor`
  for a `SmartEditPipeline` (with the LLM's sampling settings), else an `Editor`."""
  if isinstance(pipe, SmartEditPipeline):
    fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(EditSettings)}
    return SmartEditor(
        pipe,
        SmartEditSettings(**fields, temperature=temperature, max_new_tokens=max_new_tokens),
    )
  return Editor(pipe, settings)
