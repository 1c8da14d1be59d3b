"""Instruction-based editing with a loaded pipeline: image -> latents -> guided sampling -> image.

`Editor` is what `mre.edit`, `mre.eval` and the trainer's validation grid call. It follows
StableDiffusionInstructPix2PixPipeline: the original image enters as the VAE posterior *mode*
(unscaled), the prompt through CLIP's last hidden state, the empty prompt as the unconditional
text, and, for a reward U-Net, the same reward condition goes to every guidance branch.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from mre.diffusion import make_edit_sampler, schedule_from_config
from mre.models.reward_config import NULL_TEXT, PERFECT_SCORES, RewardInputs
from mre.models.reward_unet import RewardUNet
from mre.pipeline import Pipeline, tokenize


@dataclasses.dataclass(frozen=True)
class EditSettings:
  steps: int = 30
  sampler: str = "euler_ancestral"
  text_scale: float = 7.5  # s_T
  image_scale: float = 1.5  # s_I
  seed: int = 42
  resolution: int = 512  # long side, before rounding to the model's size multiple
  reward_scores: tuple = PERFECT_SCORES
  reward_texts: Optional[tuple] = None  # None: the form's "nothing is wrong" texts
  reward_scale: Optional[float] = None  # reward guidance s_R (needs a model trained with dropout)
  # Ours: guide away from these scores (with the settings' texts) instead of the null reward, like
  # a negative prompt; needs no reward dropout, since stage 2 trains on low scores.
  reward_negative_scores: Optional[tuple] = None
  # ... and with these failure texts (None: the settings' texts), e.g. a quality text that names
  # the artifact to steer away from: (None, None, "the image is blurry"), None keeping that
  # perspective's text ("" is the empty text).
  reward_negative_texts: Optional[tuple] = None
  eta: float = 0.0

  def __post_init__(self):
    if self.reward_negative_scores is not None and self.reward_scale is None:
      raise ValueError("reward_negative_scores: guiding away from a reward needs reward_scale")
    if self.reward_negative_texts is not None:
      if self.reward_negative_scores is None:
        raise ValueError("reward_negative_texts needs reward_negative_scores (the reward to avoid)")
      if len(self.reward_negative_texts) != 3:
        raise ValueError(f"reward_negative_texts: 3 texts, got {self.reward_negative_texts!r}")

  def negative_texts(self, perfect: tuple) -> Optional[tuple]:
    """The texts of the reward guided away from: each None replaced by the settings' text (by
    default the form's `perfect` one); None when no texts are set."""
    if self.reward_negative_texts is None:
      return None
    base = self.reward_texts or perfect
    return tuple(b if t is None else t for t, b in zip(self.reward_negative_texts, base))


def size_multiple(pipe: Pipeline) -> int:
  """Edge lengths must divide by the VAE's and the U-Net's downsampling (64 for SD 1.5)."""
  vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
  unet_factor = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
  return vae_factor * unet_factor


def fit_size(width: int, height: int, resolution: int, multiple: int):
  """Long side scaled to `resolution`, both sides rounded to a multiple (at least one multiple)."""
  scale = resolution / max(width, height)
  fit = lambda v: max(multiple, int(round(v * scale / multiple)) * multiple)
  return fit(width), fit(height)


def load_image(path: str) -> Image.Image:
  try:
    with Image.open(path) as img:
      return img.convert("RGB")
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from e


def to_model_input(img: Image.Image, size) -> np.ndarray:
  img = img.convert("RGB")
  if img.size != tuple(size):
    img = img.resize(tuple(size), Image.LANCZOS)
  return np.asarray(img, np.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
  return np.asarray(np.clip((np.asarray(images, np.float32) + 1.0) * 127.5 + 0.5, 0, 255), np.uint8)


def shard_batch(x):
  """Splits the batch over all local devices when it divides evenly; jit follows the sharding."""
  devices = jax.local_devices()
  if len(devices) == 1 or x.shape[0] % len(devices):
    return x
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))


class Editor:
  """Edits batches of same-sized images; compiled once per (batch, size)."""

  def __init__(self, pipe: Pipeline, settings: EditSettings = EditSettings()):
    self.pipe, self.settings = pipe, settings
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
      module.eval()  # no dropout at inference
    self.schedule = schedule_from_config(pipe.scheduler_config)
    self.is_reward = isinstance(pipe.unet, RewardUNet)
    if settings.reward_scale is not None and not self.is_reward:
      raise ValueError("reward guidance (reward_scale) needs a reward-conditioned model")
    self._sample = edit_sampler(self.schedule, settings, pipe.vae.config.latent_channels)
    self._encode_text = nnx.jit(lambda te, ids: te(ids))
    self._encode_image = nnx.jit(lambda vae, x: vae.encode(x).mode())
    self._decode = nnx.jit(lambda vae, z: vae.decode(vae.unscale_latents(z)))
    self.multiple = size_multiple(pipe)

  def text_features(self, texts: Sequence[str]):
    """(last hidden state [N, 77, D], pooled [N, D]) of CLIP for the texts."""
    return self._encode_text(self.pipe.text_encoder, tokenize(self.pipe.tokenizer, texts))

  def reward_inputs(self, batch: int, scores=None, texts=None) -> RewardInputs:
    """The reward condition for `batch` samples (default: the settings' reward, i.e. perfect)."""
    form = self.pipe.unet.reward_config
    scores = self.settings.reward_scores if scores is None else scores
    texts = texts or self.settings.reward_texts or form.perfect_texts
    if len(scores) != 3 or len(texts) != 3:
      raise ValueError(f"a reward is 3 scores and 3 texts, got {scores} and {texts}")
    _, pooled = self.text_features(form.slot_texts(texts))
    return RewardInputs(
        jnp.broadcast_to(jnp.asarray(scores, jnp.float32), (batch, 3)),
        jnp.broadcast_to(pooled[None], (batch,) + pooled.shape),
    )

  def null_reward(self, batch: int) -> RewardInputs:
    """The unconditional reward of reward guidance: the one reward dropout trains with."""
    _, pooled = self.text_features([NULL_TEXT])
    return self.pipe.unet.reward_config.null_reward(pooled, batch)

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
    if any(not (t and t.strip()) for t in instructions):
      raise ValueError("every image needs a non-empty instruction")
    b = images.shape[0]
    text, _ = self.text_features(list(instructions))
    uncond, _ = self.text_features([""])
    image_latents = self._encode_image(self.pipe.vae, shard_batch(jnp.asarray(images)))
    extra = extra_uncond = None
    if self.is_reward:
      extra = {"reward": reward if reward is not None else self.reward_inputs(b)}
      if self.settings.reward_negative_scores is not None:
        texts = self.settings.negative_texts(self.pipe.unet.reward_config.perfect_texts)
        extra_uncond = {
            "reward": self.reward_inputs(
                b, scores=self.settings.reward_negative_scores, texts=texts
            )
        }
      elif self.settings.reward_scale is not None:
        extra_uncond = {"reward": self.null_reward(b)}
    key = jax.random.key(self.settings.seed) if key is None and noise is None else key
    latents = self._sample(
        self.pipe.unet,
        image_latents,
        text,
        uncond,
        key=key,
        noise=noise,
        extra_cond=extra,
        extra_cond_uncond=extra_uncond,
    )
    return np.asarray(self._decode(self.pipe.vae, latents), np.float32)

  def edit(
      self,
      images: Sequence[Image.Image],
      instructions: Sequence[str],
      *,
      batch_size=8,
      reward: Optional[RewardInputs] = None,
      progress=None,
  ):
    """PIL images + instructions -> edited PIL images (each at its fitted size); see
    `edit_images`."""
    return edit_images(
        self, images, instructions, batch_size=batch_size, reward=reward, progress=progress
    )


def edit_images(
    editor,
    images: Sequence[Image.Image],
    instructions: Sequence[str],
    *,
    batch_size=8,
    reward: Optional[RewardInputs] = None,
    progress=None,
):
  """PIL images + instructions -> edited PIL images (each at its fitted size), with any editor
  that has `settings`, `multiple` and `edit_arrays` (Editor, SmartEditor).

  Images are grouped by fitted size; batch `i` of a group uses the key fold_in(seed, i), so a
  result does not depend on which other images were edited alongside in other groups.
  """
  if len(images) != len(instructions):
    raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
  sizes = [fit_size(*img.size, editor.settings.resolution, editor.multiple) for img in images]
  out = [None] * len(images)
  base = jax.random.key(editor.settings.seed)
  for size in dict.fromkeys(sizes):
    idx = [i for i, s in enumerate(sizes) if s == size]
    for n, start in enumerate(range(0, len(idx), batch_size)):
      chunk = idx[start : start + batch_size]
      arr = np.stack([to_model_input(images[i], size) for i in chunk])
      r = None if reward is None else jax.tree.map(lambda a: a[np.asarray(chunk)], reward)
      edited = editor.edit_arrays(
          arr, [instructions[i] for i in chunk], key=jax.random.fold_in(base, n), reward=r
      )
      for i, e in zip(chunk, to_uint8(edited)):
        out[i] = Image.fromarray(e)
      if progress is not None:
        progress.update(len(chunk))
  return out


def edit_sampler(schedule, settings, latent_channels: int):
  """The compiled guided sampler for an editor's settings (`EditSettings` or a subclass)."""
  return make_edit_sampler(
      schedule,
      settings.steps,
      settings.sampler,
      text_scale=settings.text_scale,
      image_scale=settings.image_scale,
      reward_scale=settings.reward_scale,
      eta=settings.eta,
      latent_channels=latent_channels,
  )
