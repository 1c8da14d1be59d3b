"""The PyTorch rows: diffusers' `UNet2DConditionModel` built from the same config dict, fed the same
batch, timed the same way (eager mode, as diffusers' training script and pipelines run).

  unet_train    forward, MSE, backward, gradient clipping, `torch.optim.AdamW`
  trainer       what diffusers' `train_instruct_pix2pix.py` does per step: VAE encoding (no grad),
                CLIP text encoding, InstructPix2Pix conditioning dropout, noising, U-Net, loss,
                backward, clipping, AdamW, EMA (`torch._foreach_lerp_`)
  conv_*        one 3x3 convolution: `conv2d`, or one gradient of aten's `convolution_backward`

bfloat16 presets train under `torch.autocast` with float32 weights (diffusers' mixed
precision), like the JAX side. The editing rows are in `torch_edit`.
"""

from __future__ import annotations

import contextlib

import numpy as np

from mre.bench.inputs import Inputs, nchw
from mre.bench.presets import Preset
from mre.bench.timing import Runner


def unavailable() -> str | None:
  """Why the PyTorch column is empty, or None when torch and diffusers import."""
  try:
    import diffusers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import transformers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    return f"not importable ({e.name or e})"
  return None


@contextlib.contextmanager
def threads(n: int | None):
  """torch's intra-op thread count set to `n` for the duration (nothing when None or no torch)."""
  if n is None or unavailable():
    yield
    return
  import torch  # pylint: disable=import-outside-toplevel

  before = torch.get_num_threads()
  torch.set_num_threads(n)
  try:
    yield
  finally:
    torch.set_num_threads(before)


def device(platform: str) -> str:
  """CUDA when JAX runs on a GPU and torch sees one, else the CPU."""
  import torch  # pylint: disable=import-outside-toplevel

  if platform == "gpu" and torch.cuda.is_available():
    # float32 matmuls and convolutions on TF32 tensor cores, as JAX's default precision runs them.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return "cuda"
  return "cpu"


def release(dev: str | None):
  """Returns the memory torch's caching allocator holds on the GPU (JAX shares the device)."""
  if dev == "cuda":
    import torch  # pylint: disable=import-outside-toplevel

    torch.cuda.empty_cache()


def info(dev: str) -> dict:
  import diffusers  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  out = {"torch": torch.__version__, "diffusers": diffusers.__version__, "device": dev}
  out["threads"] = torch.get_num_threads()
  if dev == "cuda":
    out["kind"] = torch.cuda.get_device_name(0)
  return out


class Side:
  """The preset's PyTorch networks and helpers on one device."""

  def __init__(self, preset: Preset, dev: str):
    import torch  # pylint: disable=import-outside-toplevel

    self.torch, self.preset, self.dev = torch, preset, dev
    self.bf16 = preset.dtype in ("bfloat16", "float16")
    self.half = torch.bfloat16 if preset.dtype == "bfloat16" else torch.float16

  def tensor(self, x, dtype=None):
    t = self.torch.from_numpy(np.ascontiguousarray(x)).to(self.dev)
    return t if dtype is None else t.to(dtype)

  def sync(self):
    if self.dev == "cuda":
      self.torch.cuda.synchronize()

  def autocast(self):
    if not self.bf16:
      return contextlib.nullcontext()
    return self.torch.autocast(self.dev, dtype=self.half)

  def unet(self):
    from diffusers import UNet2DConditionModel  # pylint: disable=import-outside-toplevel

    self.torch.manual_seed(0)
    # Our own keys (mre_source_skip: applied around the U-Net by the train step and samplers,
    # not inside it) are not diffusers'; the network is the same without them.
    cfg = {k: v for k, v in self.preset.unet.items() if not k.startswith("mre_")}
    with self.torch.device(self.dev):
      return UNet2DConditionModel.from_config(cfg)

  def text_encoder(self):
    from transformers import CLIPTextConfig, CLIPTextModel  # pylint: disable=import-outside-toplevel

    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "hidden_act",
        "eos_token_id",
        "layer_norm_eps",
    )
    cfg = {k: v for k, v in self.preset.text.items() if k in keys}
    with self.torch.device(self.dev):
      return CLIPTextModel(CLIPTextConfig(**cfg))

  def vae(self):
    from diffusers import AutoencoderKL  # pylint: disable=import-outside-toplevel

    if self.preset.vae is None:
      return None
    with self.torch.device(self.dev):
      return AutoencoderKL.from_config(self.preset.vae)

  def optimizer(self, params):
    t = self.preset.config.train
    return self.torch.optim.AdamW(
        params,
        lr=t.lr,
        betas=(t.adam_b1, t.adam_b2),
        eps=t.adam_eps,
        weight_decay=t.weight_decay,
    )

  def peak_memory_gb(self):
    if self.dev != "cuda":
      return None
    return self.torch.cuda.max_memory_allocated() / 2**30

  def reset_memory(self):
    if self.dev == "cuda":
      self.torch.cuda.empty_cache()
      self.torch.cuda.reset_peak_memory_stats()

  def runner(self, call, items: int, **info) -> Runner:
    return Runner(call, items, info, lambda: {"memory_gb": self.peak_memory_gb()})


def unet_train(preset: Preset, inputs: Inputs, dev: str) -> Runner:
  s = Side(preset, dev)
  torch = s.torch
  s.reset_memory()
  unet = s.unet().train()
  params = list(unet.parameters())
  opt = s.optimizer(params)
  clip = preset.config.train.clip
  b = inputs.unet_batch(preset.batch)
  x, ctx, target = s.tensor(nchw(b["sample"])), s.tensor(b["context"]), s.tensor(nchw(b["target"]))
  ts = s.tensor(b["timesteps"].astype(np.int64))

  def call():
    opt.zero_grad(set_to_none=True)
    with s.autocast():
      out = unet(x, ts, ctx).sample
    loss = torch.nn.functional.mse_loss(out.float(), target)
    loss.backward()
    if clip > 0:
      torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    s.sync()

  return s.runner(call, preset.batch)


def trainer(preset: Preset, inputs: Inputs, dev: str) -> Runner | str:
  """The step of diffusers' training script (or why there is none: a reward U-Net)."""
  from diffusers import DDPMScheduler  # pylint: disable=import-outside-toplevel

  if preset.config.model.reward.enabled:
    return "the reward U-Net has no diffusers counterpart"
  s = Side(preset, dev)
  torch = s.torch
  s.reset_memory()
  t = preset.config.train
  unet, text, vae = s.unet().train(), s.text_encoder(), s.vae()
  params = list(unet.parameters())
  if preset.train_text_encoder:
    text.train()
    params += list(text.parameters())
  else:
    text.requires_grad_(False).eval()
  if vae is not None:
    vae.requires_grad_(False).eval()
  opt = s.optimizer(params)
  ema = [p.detach().clone() for p in params]
  scheduler = DDPMScheduler.from_config(preset.scheduler)
  batch = {k: v[0] for k, v in inputs.trainer_batch(preset.batch, None).items()}
  edited, original = s.tensor(nchw(batch["edited"])), s.tensor(nchw(batch["original"]))
  ids = s.tensor(batch["instruction_ids"].astype(np.int64))
  empty_ids = s.tensor(inputs.empty_ids.astype(np.int64))
  b, p = preset.batch, t.cond_dropout
  prediction = scheduler.config.prediction_type
  edit_weight = t.get("edit_weight", 0.0)

  def call():
    opt.zero_grad(set_to_none=True)
    with s.autocast():
      with torch.no_grad():
        if vae is not None:
          target_latents = vae.encode(edited).latent_dist.sample() * vae.config.scaling_factor
          image_latents = vae.encode(original).latent_dist.mode()
        else:
          target_latents, image_latents = edited, original
        source_latents = image_latents  # before dropout: the edit region is read from it
      with contextlib.nullcontext() if preset.train_text_encoder else torch.no_grad():
        context = text(ids)[0]
        empty = text(empty_ids)[0]
      noise = torch.randn_like(target_latents)
      steps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), device=dev)
      noisy = scheduler.add_noise(target_latents, noise, steps)
      # InstructPix2Pix conditioning dropout, as diffusers' training script draws it.
      r = torch.rand(b, device=dev)
      context = torch.where((r < 2 * p)[:, None, None], empty.expand_as(context), context)
      keep_image = 1 - ((r >= p) & (r < 3 * p)).to(image_latents.dtype)
      image_latents = image_latents * keep_image[:, None, None, None]
      if prediction == "v_prediction":
        target = scheduler.get_velocity(target_latents, noise, steps)
      else:
        target = target_latents if prediction == "sample" else noise
      out = unet(torch.cat([noisy, image_latents], 1), steps, context).sample
    squared = (out.float() - target.float()) ** 2
    if edit_weight > 0:  # the edit-region weight of mre/train_step.py (no smoothing or dilation)
      diff = (target_latents - source_latents).float()
      changed = (diff.abs().amax(1, keepdim=True) > t.edit_threshold).float()
      weight = 1.0 + edit_weight * changed
      loss = ((weight * squared).mean((1, 2, 3)) / weight.mean((1, 2, 3))).mean()
    else:
      loss = squared.mean()
    loss.backward()
    if t.clip > 0:
      torch.nn.utils.clip_grad_norm_(params, t.clip)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - t.ema_decay)  # pylint: disable=protected-access
    s.sync()

  return s.runner(call, preset.batch)


def conv(preset: Preset, inputs: Inputs, dev: str, row: str) -> Runner:
  """The same convolution with `conv2d` and aten's `convolution_backward` (one gradient each)."""
  s = Side(preset, dev)
  torch = s.torch
  x, w, dy = inputs.conv_arrays(preset.batch)
  x, dy, w = s.tensor(nchw(x)), s.tensor(nchw(dy)), s.tensor(w.transpose(3, 2, 0, 1))
  mask = {"conv_input_grad": [True, False, False], "conv_weight_grad": [False, True, False]}

  def call():
    with torch.no_grad():
      if row == "conv_forward":
        torch.nn.functional.conv2d(x, w, padding=1)
      else:
        args = (dy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask[row])
        torch.ops.aten.convolution_backward(*args)
    s.sync()

  return s.runner(call, preset.batch)
