"""Dual classifier-free guidance of InstructPix2Pix, with an optional reward-guidance branch.

All branches run in ONE network call, stacked along the batch axis in diffusers'
StableDiffusionInstructPix2PixPipeline order:

  branch         text context       image latents    extra condition
  0 full         text_emb           image_latents    extra_cond
  1 image        uncond_text_emb    image_latents    extra_cond
  2 uncond       uncond_text_emb    zeros            extra_cond
  3 (reward)     text_emb           image_latents    extra_cond_uncond     only with reward_scale

  eps = eps_uncond + s_T * (eps_full - eps_image) + s_I * (eps_image - eps_uncond)
        [+ s_R * (eps_full - eps_reward_uncond)]

The first line is the pipeline's arithmetic, term for term. The reward term is ours: it pushes away
from the prediction made with the unconditional reward (e.g. neutral scores / empty failure texts)
while keeping the text and image conditions, like the text term does for the instruction.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

ModelFn = Callable[..., jax.Array]


def guidance_enabled(text_scale, image_scale) -> bool:
  """diffusers' switch: the pipeline runs the three guidance branches only when
  text_scale > 1 and image_scale >= 1; otherwise it makes a single fully conditioned call.
  Traced (non-Python) scales count as enabled."""
  if isinstance(text_scale, numbers.Real) and isinstance(image_scale, numbers.Real):
    return text_scale > 1.0 and image_scale >= 1.0
  return True


def guidance_branches(text_scale, image_scale, reward_scale=None) -> int:
  """How many rows per edit `dual_guidance` stacks into its one network call."""
  if not guidance_enabled(text_scale, image_scale):
    return 1
  return 3 if reward_scale is None else 4


def _concat_batch(*trees: Any) -> Any:
  return jax.tree_util.tree_map(lambda *leaves: jnp.concatenate(leaves, axis=0), *trees)


def dual_guidance(
    model_fn: ModelFn,
    latents_input: jax.Array,
    image_latents: jax.Array,
    text_emb: jax.Array,
    uncond_text_emb: jax.Array,
    t: jax.Array,
    text_scale: float = 7.5,
    image_scale: float = 1.5,
    extra_cond: Optional[Mapping[str, Any]] = None,
    extra_cond_uncond: Optional[Mapping[str, Any]] = None,
    reward_scale: Optional[float] = None,
    channel_axis: int = -1,
    self_cond: Optional[jax.Array] = None,
):
  """Guided model output for a batch of B edits, from one call of `model_fn` on 3B (or 4B) rows.

  Args:
    model_fn: `model_fn(sample, timesteps, context, **extra_cond) -> output` (a U-Net), where
      sample = [latents_input | image latents] concatenated on `channel_axis`, timesteps [kB].
    latents_input: the noisy latents already passed through `scale_model_input`, [B, ...].
    image_latents: latents of the original image, [B, ...] (the pipeline does NOT multiply them by
      the VAE scaling factor: it uses the posterior mode as is).
    text_emb / uncond_text_emb: [B, L, D]; uncond may have batch 1 (broadcast).
    t: the timestep, a scalar (what the samplers pass) or per example [B]; every branch of an
      example gets the same value.
    extra_cond: optional dict of keyword arguments for `model_fn` (pytrees with batch-leading
      leaves, e.g. reward scores and reward text embeddings); given identically to branches 0-2.
    extra_cond_uncond, reward_scale: the unconditional reward and its scale s_R; together they
      add branch 3 and the term s_R * (eps_full - eps_reward_uncond) (see the module docstring).

  Returns the guided output, [B, ...] with the channels of the model output.

  self_cond: for a self-conditioned model (mre/diffusion/self_condition.py), the x0 estimates of
  every row of the call, [kB, ...] in the branch order above (`guidance_branches` gives k); they
  reach `model_fn` as `self_cond=`, and the return value is then (guided output, the call's raw
  output [kB, ...]), from which the caller makes the next step's estimates.

  When both scales are Python numbers and `guidance_enabled` is False (text_scale <= 1 or
  image_scale < 1) the pipeline skips guidance altogether; so does this function, returning the
  fully conditioned output (branch 0 only).
  """
  batch = latents_input.shape[0]
  uncond_text_emb = jnp.broadcast_to(uncond_text_emb, text_emb.shape).astype(text_emb.dtype)
  zeros_image = jnp.zeros_like(image_latents)
  with_reward_branch = reward_scale is not None
  if with_reward_branch and (extra_cond is None or extra_cond_uncond is None):
    raise ValueError(
        "extra_cond_uncond: reward guidance (reward_scale) needs extra_cond and its unconditional twin"
    )

  if not guidance_enabled(text_scale, image_scale):
    contexts, images, extras = [text_emb], [image_latents], [extra_cond]
  else:
    contexts = [text_emb, uncond_text_emb, uncond_text_emb]
    images = [image_latents, image_latents, zeros_image]
    extras = [extra_cond] * 3
    if with_reward_branch:
      contexts.append(text_emb)
      images.append(image_latents)
      extras.append(extra_cond_uncond)
  copies = len(contexts)

  sample = jnp.concatenate(
      [jnp.concatenate([latents_input] * copies, axis=0), jnp.concatenate(images, axis=0)],
      axis=channel_axis,
  )
  t = jnp.asarray(t)
  timesteps = (
      jnp.broadcast_to(t, (copies * batch,)) if t.ndim == 0 else jnp.concatenate([t] * copies)
  )
  kwargs = {} if extra_cond is None else dict(_concat_batch(*extras))
  if self_cond is not None:
    if self_cond.shape[0] != copies * batch:
      raise ValueError(
          f"self_cond: {copies} guidance branches x {batch} edits need {copies * batch} x0 "
          f"estimates, got {self_cond.shape[0]}"
      )
    kwargs["self_cond"] = self_cond
  output = model_fn(sample, timesteps, jnp.concatenate(contexts, axis=0), **kwargs)
  guided = (
      output if copies == 1 else _combine(output, copies, text_scale, image_scale, reward_scale)
  )
  return guided if self_cond is None else (guided, output)


def _combine(output, copies, text_scale, image_scale, reward_scale):
  """The guidance arithmetic over the stacked branch outputs (module docstring)."""
  branches = jnp.split(output, copies, axis=0)
  eps_full, eps_image, eps_uncond = branches[:3]
  guided = eps_uncond + text_scale * (eps_full - eps_image) + image_scale * (eps_image - eps_uncond)
  if copies == 4:
    guided = guided + reward_scale * (eps_full - branches[3])
  return guided
