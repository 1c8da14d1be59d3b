"""The PyTorch editing rows: diffusers' networks in the computation dtype (bfloat16 weights for the
SD 1.5 presets), the guided U-Net call of one sampling step, and edits with
`StableDiffusionInstructPix2PixPipeline` or, for a pixel-space editor (no VAE), the same loop
over the U-Net and `EulerAncestralDiscreteScheduler`.
"""

from __future__ import annotations

from mre.bench import torch_side
from mre.bench.inputs import Inputs, nchw
from mre.bench.presets import Preset
from mre.bench.timing import Runner


class EditNetworks:
  """The editor's PyTorch networks, built once for the forward and the edit rows."""

  def __init__(self, preset: Preset, dev: str):
    self.side = s = torch_side.Side(preset, dev)
    s.reset_memory()
    dtype = s.half if s.bf16 else s.torch.float32
    self.unet = s.unet().eval().to(dtype)
    self.text = s.text_encoder().eval().to(dtype)
    self.vae = s.vae()
    if self.vae is not None:
      self.vae = self.vae.eval().to(dtype)
    self.dtype = dtype
    # A reward editor's JAX rows run its reward U-Net; diffusers has no reward modules.
    reward = preset.config is not None and preset.config.model.reward.enabled
    self.note = {"note": "diffusers' plain U-Net (no reward modules)"} if reward else {}


def unet_forward(nets: EditNetworks, inputs: Inputs) -> Runner:
  """One guided step's U-Net call: the three branches stacked (batch 3) and the guidance sum."""
  s = nets.side
  torch = s.torch
  a = inputs.edit_unet_args(1)
  lat, img = s.tensor(nchw(a["latents"]), nets.dtype), s.tensor(nchw(a["image"]), nets.dtype)
  text, uncond = s.tensor(a["text"], nets.dtype), s.tensor(a["uncond"], nets.dtype)
  sample = torch.cat([torch.cat([lat] * 3), torch.cat([img, img, torch.zeros_like(img)])], 1)
  context = torch.cat([text, uncond, uncond])
  t = torch.tensor(float(a["t"]), device=s.dev)

  def call():
    with torch.inference_mode():
      full, image, none = nets.unet(sample, t, context).sample.chunk(3)
      out = none + 7.5 * (full - image) + 1.5 * (image - none)
    s.sync()
    return out

  return s.runner(call, 1, **nets.note)


def _pixel_edit(nets: EditNetworks, preset: Preset, images, instructions):
  """StableDiffusionInstructPix2PixPipeline's loop for a pixel-space editor (no VAE)."""
  from diffusers import EulerAncestralDiscreteScheduler  # pylint: disable=import-outside-toplevel

  s = nets.side
  torch = s.torch
  # diffusers' Euler ancestral takes epsilon or v; an x0 ("sample") editor's guided output is
  # turned into the epsilon that gives the same x0 (sample = x0 + sigma * eps in its units).
  x0_pred = preset.scheduler.get("prediction_type") == "sample"
  config = {**preset.scheduler, "prediction_type": "epsilon"} if x0_pred else preset.scheduler
  scheduler = EulerAncestralDiscreteScheduler.from_config(config)
  tok = preset.tokenizer
  ids = tok(instructions + [""], padding="max_length", max_length=preset.tokens, truncation=True)
  with torch.inference_mode():
    ids = torch.tensor(ids.input_ids, device=s.dev)
    emb = nets.text(ids)[0]
    b = len(instructions)
    text, uncond = emb[:b], emb[b:].expand(b, -1, -1)
    context = torch.cat([text, uncond, uncond])
    image = s.tensor(nchw(images), nets.dtype)
    image = torch.cat([image, image, torch.zeros_like(image)])
    scheduler.set_timesteps(preset.edit_steps, device=s.dev)
    gen = torch.Generator(s.dev).manual_seed(0)
    latents = torch.randn(image[:b].shape, generator=gen, device=s.dev, dtype=nets.dtype)
    latents = latents * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
      x = scheduler.scale_model_input(torch.cat([latents] * 3), t)
      full, img, none = nets.unet(torch.cat([x, image], 1), t, context).sample.chunk(3)
      eps = none + 7.5 * (full - img) + 1.5 * (img - none)
      if x0_pred:
        eps = (latents - eps) / scheduler.sigmas[i]
      latents = scheduler.step(eps, t, latents, generator=gen).prev_sample
    out = latents.float().cpu().numpy()
  return out


def edit(nets: EditNetworks, preset: Preset, inputs: Inputs, batch: int) -> Runner:
  """`batch` images edited at once, N Euler-ancestral steps, three guidance branches."""
  from diffusers import (  # pylint: disable=import-outside-toplevel
      EulerAncestralDiscreteScheduler,
      StableDiffusionInstructPix2PixPipeline,
  )

  s = nets.side
  images, instructions = inputs.edit_images(batch)
  if nets.vae is None:
    run = lambda: _pixel_edit(nets, preset, images, instructions)  # noqa: E731
    how = "the pipeline's loop over diffusers' U-Net (pixel space)"
  else:
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=nets.vae,
        text_encoder=nets.text,
        tokenizer=preset.tokenizer,
        unet=nets.unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(preset.scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pil_range = (images + 1.0) / 2.0

    def run():
      out = pipe(
          instructions,
          image=pil_range,
          num_inference_steps=preset.edit_steps,
          guidance_scale=7.5,
          image_guidance_scale=1.5,
          generator=s.torch.Generator(s.dev).manual_seed(0),
          output_type="np",
      ).images
      s.sync()
      return out

    how = "StableDiffusionInstructPix2PixPipeline"
  return s.runner(run, batch, steps=preset.edit_steps, how=how, **nets.note)
