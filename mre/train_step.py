"""The training state and the jitted train step of the editor (stage 1 or stage 2).

The step: VAE latents of the edited image (a posterior sample, scaled) are noised; the U-Net sees
[noisy latents | latents of the original image (posterior mode, unscaled)], the instruction's CLIP
context and, for stage 2, the reward. InstructPix2Pix conditioning dropout and optional reward
dropout (mre/diffusion/condition_dropout.py), gradient accumulation as a scan over
micro-batches, AdamW with global-norm clipping, EMA, and a guard that keeps the old state and
reports when loss or gradients are not finite.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import nnx

from mre.diffusion.condition_dropout import (
    conditioning_dropout,
    drop_reward_texts,
    drop_rewards,
)
from mre.diffusion.schedule import (
    NoiseSchedule,
    add_noise,
    edm_weight,
    min_snr_weight,
    training_target,
)
from mre.diffusion.rollout import rollout_inputs
from mre.diffusion.self_condition import predicted_x0, self_conditioned, training_estimate
from mre.diffusion.source_skip import denoiser
from mre.models.reward_config import RewardConfig, RewardInputs
from mre.models.vae import DiagonalGaussian


class NonFiniteError(FloatingPointError):
  """Loss or gradients became NaN/inf; the state of the last good step is kept."""


def log_metrics(history: list, writer, step: int, m: dict, shown=("loss", "grad_norm", "lr")):
  """A logged step: `m` appended to `history`, every value to TensorBoard (`writer`, or None),
  the `shown` ones to the log."""
  history.append({"step": step, **m})
  if writer:
    for k, v in m.items():
      writer.add_scalar(f"train/{k}", v, step)
  logging.info("step %d " + " ".join(f"{k} %.4g" for k in shown), step, *(m[k] for k in shown))


class StepTimer:
  """Wall-clock seconds per step between the logged steps (`per_step`)."""

  def __init__(self, step: int):
    self.time, self.step = time.time(), step

  def per_step(self, step: int) -> float:
    now = time.time()
    dt = (now - self.time) / max(step - self.step, 1)
    self.time, self.step = now, step
    return dt


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # {"unet": nnx.State, ["text_encoder": nnx.State]}: what is trained
  ema: Any  # same structure as params
  opt_state: Any
  rng: jax.Array  # raw key data; each step uses fold_in(rng, step), so resuming is exact


def init_train_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """The state at step 0: EMA equal to the parameters, a fresh optimizer state."""
  return TrainState(
      step=jnp.int32(0),
      params=params,
      ema=jax.tree.map(jnp.copy, params),
      opt_state=tx.init(params),
      rng=jax.random.key_data(jax.random.key(seed)),
  )


@dataclasses.dataclass
class SplitModel:
  """A module split into its static graph, its parameters and its other state (dropout RNGs)."""

  graphdef: Any
  params: Any
  rest: Any

  @classmethod
  def of(cls, module):
    return cls(*nnx.split(module, nnx.Param, ...))

  def merge(self, params=None):
    # Fresh Variables for the other state: a merge inside a trace may then reseed dropout RNGs
    # (NNX refuses to mutate Variables created outside the current trace).
    rest = jax.tree.map(lambda x: x, self.rest)
    return nnx.merge(self.graphdef, self.params if params is None else params, rest)


def lr_schedule(cfg) -> optax.Schedule:
  t = cfg.train
  if t.lr_schedule == "constant":
    if t.warmup_steps:
      return optax.join_schedules(
          [optax.linear_schedule(0.0, t.lr, t.warmup_steps), optax.constant_schedule(t.lr)],
          [t.warmup_steps],
      )
    return optax.constant_schedule(t.lr)
  if t.lr_schedule == "cosine":
    warmup = min(t.warmup_steps, max(t.steps - 1, 0))
    if warmup == 0:  # the peak at step 0 (a 1-step optax warm-up would spend step 0 at lr 0)
      return optax.cosine_decay_schedule(t.lr, max(t.steps, 1), alpha=0.05)
    return optax.warmup_cosine_decay_schedule(
        0.0, t.lr, warmup, max(t.steps, warmup + 1), end_value=t.lr * 0.05
    )
  raise ValueError(f"train.lr_schedule={t.lr_schedule!r} is not 'constant' or 'cosine'")


def make_optimizer(cfg, learning_rate=None) -> optax.GradientTransformation:
  """Clipping and AdamW at the config's schedule, or at `learning_rate` (a traced scalar: the
  trainer's step takes the rate as an input). Either way the rate is a function of the step count,
  so the optimizer state has one structure (checkpoints of both load into both)."""
  t = cfg.train
  rate = lr_schedule(cfg) if learning_rate is None else (lambda count: learning_rate)
  return optax.chain(
      optax.clip_by_global_norm(t.clip) if t.clip > 0 else optax.identity(),
      optax.adamw(rate, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps, weight_decay=t.weight_decay),
  )


def ema_decay(step, max_decay):
  """diffusers' EMA warm-up: the decay grows as (1 + step) / (10 + step) up to `max_decay`."""
  step = step.astype(jnp.float32)
  return jnp.minimum(max_decay, (1.0 + step) / (10.0 + step))


@dataclasses.dataclass
class StepContext:
  """Everything static the step needs besides the state and the batch."""

  unet: SplitModel
  text_encoder: SplitModel
  vae: SplitModel
  frozen: dict  # parameters that are not trained (text encoder when frozen, VAE)
  schedule: NoiseSchedule
  empty_ids: jax.Array  # [1, 77] token ids of the empty prompt
  reward: Optional[RewardConfig]  # None: stage 1 (no reward)
  cfg: Any

  def modules(self, params):
    text_params = params.get("text_encoder", self.frozen.get("text_encoder"))
    return (
        self.unet.merge(params["unet"]),
        self.text_encoder.merge(text_params),
        self.vae.merge(self.frozen["vae"]),
    )


def edit_region(target, source, threshold: float, smoothing: int = 1):
  """1 where the target differs from the source, else 0, shape [B, H, W, 1].

  The region is where any channel of the difference, averaged over a `smoothing` x `smoothing`
  window (1: per position), exceeds `threshold` (model space: pixels in [-1, 1] or scaled
  latents). The average keeps flat changes (a recoloured object) and drops pixel noise and blur
  (signed differences that cancel), so that flawed targets' noise is not what a weight on the
  region teaches.
  """
  diff = target - source
  if smoothing > 1:
    if smoothing % 2 == 0:
      raise ValueError(f"train.edit_smoothing must be odd, got {smoothing}")
    window, pad = (1, smoothing, smoothing, 1), "SAME"
    total = jax.lax.reduce_window(diff, 0.0, jax.lax.add, window, (1, 1, 1, 1), pad)
    count = jax.lax.reduce_window(
        jnp.ones(diff.shape[:3] + (1,), diff.dtype), 0.0, jax.lax.add, window, (1, 1, 1, 1), pad
    )
    diff = total / count  # the mean over the window's positions inside the image
  return (jnp.max(jnp.abs(diff), axis=-1, keepdims=True) > threshold).astype(jnp.float32)


def edit_region_weight(
    target,
    source,
    strength: float,
    threshold: float,
    smoothing: int = 1,
    dilation: int = 0,
    minority: bool = False,
    estimate=None,
):
  """Per-position loss weight 1 + strength inside `edit_region`, shape [B, H, W, 1].

  A small object's edit is a few percent of an image's squared error, so the plain loss is lowered
  most by copying the source and changing the large regions (backgrounds, global tones); weighting
  the positions the edit changes lets object-level edits be learned in a short run (README, "What
  the toy editor needed"). `dilation` > 0 widens the region by that many positions on every side
  (a max over a (2 d + 1)-square window): the edit's surroundings, where a soft halo around an
  edited object would otherwise cost little, weigh as much as the edit. `minority`: the weight
  goes to whichever of the changed and the unchanged region is the smaller, per sample: in a
  background edit that is the objects that must stay (which the plain form leaves ~2% of the loss,
  and the toy editors tinted), in an object edit the edit itself, as before.

  `estimate` (the model's x0 estimate, gradient stopped): the weight also falls where the
  estimate puts a position on the weighted side (changed, or unchanged where the minority flips
  the weight). A weight that only the target decides biases the estimate wherever the model is
  unsure: an object it gives probability p of being the named one is best predicted, under the
  weighted squared error, as changed by 5 p / (1 + 4 p) of the way at strength 4 (0.68 at p = 0.3)
  instead of p, so a weak guess becomes a recoloured or removed second object. With the
  estimate's changes weighted too, a change the model makes costs as much as one it misses, and
  an estimate on the weighted side is the plain conditional mean again. (Where the minority rule
  flips the weight, an estimate short of the threshold is weighted and one past it is not, which
  favours overshooting; leaving the estimate out there was measured and lost the toy claim:
  README, "The paper's claim in the toy world".) The estimate must be a trained model's: from
  scratch it changes everything and the weight becomes uniform.
  """
  changed = edit_region(target, source, threshold, smoothing)
  larger = None
  if minority:
    larger = jnp.mean(changed, axis=tuple(range(1, changed.ndim)), keepdims=True) > 0.5
    changed = jnp.where(larger, 1.0 - changed, changed)
  if estimate is not None:
    guessed = edit_region(estimate, source, threshold, smoothing)
    if larger is not None:
      guessed = jnp.where(larger, 1.0 - guessed, guessed)
    changed = jnp.maximum(changed, guessed)
  if dilation > 0:
    window = (1, 2 * dilation + 1, 2 * dilation + 1, 1)
    changed = jax.lax.reduce_window(changed, 0.0, jax.lax.max, window, (1, 1, 1, 1), "SAME")
  return 1.0 + strength * changed


def edit_region_share_weight(target, source, share: float, threshold: float, smoothing: int = 1):
  """Per-position loss weights that give the region the edit changes a fixed `share` of each
  sample's loss and the rest of the image 1 - share, shape [B, H, W, 1], mean 1 per sample.

  The constant weight of `edit_region_weight` lets a large edit's changed region drown what it
  leaves alone: in a background edit with weight 1 + 4 on the changed 90% of the image, the
  objects that must stay as they are carry 2% of the loss, and the toy editors learned to tint
  them with the new background. Here the objects of a background edit keep 1 - share of it, while
  a small object's edit still gets `share`. Samples whose edit changes nothing (or everything) are
  weighted uniformly.
  """
  changed = edit_region(target, source, threshold, smoothing)
  axes = tuple(range(1, changed.ndim))
  size = jnp.mean(changed, axis=axes, keepdims=True)
  both = (size > 0) & (size < 1)
  weight = jnp.where(
      changed > 0, share / jnp.maximum(size, 1e-6), (1.0 - share) / jnp.maximum(1.0 - size, 1e-6)
  )
  return jnp.where(both, weight, 1.0)


def edit_size_balance(target, source, power: float, threshold: float, smoothing: int, floor: float):
  """Per-sample loss weights that even out edits of different sizes, with batch mean 1.

  A background or global edit changes most of the image and a recoloured object a few percent, so
  in the batch-mean loss (and in Adam's gradient scale) the large edits dominate and object edits
  are learned last. Each sample's MSE is weighted by max(f, floor) ** -power, f being the share of
  positions its edit changes (`edit_region`): power 1 gives every triplet the same total weight on
  its changed region. Unlike the per-position weight this keeps the balance inside an image (the
  untouched objects of a background edit weigh what they did). `floor` caps the weight of tiny and
  empty edits. Shape [B]. Measured in the toy world (README, "What the toy editor needed"): at
  power 1 it stopped the large edits and taught no object edit; off in the recipes.
  """
  region = edit_region(target, source, threshold, smoothing)
  share = jnp.mean(region, axis=tuple(range(1, region.ndim)))
  weight = jnp.maximum(share, floor) ** -power
  return weight / jnp.mean(weight)


def elementwise_loss(error, kind: str = "mse", c: float = 0.03):
  """Per-element loss of the prediction error: "mse" (the squared error) or "pseudo_huber"
  (sqrt(error^2 + c^2) - c, scaled by 2c so that it equals the squared error for |error| << c).

  The squared error's gradient vanishes with the error, so small residual errors such as a soft
  halo around an edited object cost almost nothing to keep; the pseudo-Huber loss is linear in
  errors larger than c and keeps pushing them to zero (as in improved consistency training, Song
  and Dhariwal 2023, where it replaced the squared error for sharper samples)."""
  if kind == "mse":
    return error**2
  if kind == "pseudo_huber":
    return 2.0 * c * error**2 / (jnp.sqrt(error**2 + c**2) + c)  # the same, without cancellation
  raise ValueError(f"unknown train.loss {kind!r}; choose 'mse' or 'pseudo_huber'")


def micro_loss(ctx: StepContext, params, batch, key):
  """Denoising loss on one micro-batch (batch-mean of per-sample mean `train.loss`, float32; with
  `train.edit_weight`, each sample's MSE is weighted towards the region its edit changes)."""
  cfg = ctx.cfg.train
  unet, text_encoder, vae = ctx.modules(params)
  k_post, k_noise, k_t, k_cond, k_reward, k_dropout = jax.random.split(key, 6)
  nnx.reseed(unet, default=k_dropout, dropout=k_dropout)
  unet.train()  # built in eval mode; the released form's attention dropout is for training
  b = batch["instruction_ids"].shape[0]

  if "original_latent" in batch:  # precomputed by the frozen VAE (mre/data/latent_cache.py)
    posterior = DiagonalGaussian(batch["edited_mean"], batch["edited_logvar"])
    target_latents = vae.scale_latents(posterior.sample(k_post))
    image_latents = batch["original_latent"]
  else:
    target_latents = vae.scale_latents(vae.encode(batch["edited"]).sample(k_post))
    image_latents = vae.encode(batch["original"]).mode()
  source_latents = image_latents  # before conditioning dropout: the edit region is read from it
  # A batch may fix the noise and the timesteps (tests compare k micro-batches with one batch).
  noise = (
      batch["noise"]
      if "noise" in batch
      else jax.random.normal(k_noise, target_latents.shape, jnp.float32)
  )
  t = (
      batch["timesteps"]
      if "timesteps" in batch
      else jax.random.randint(k_t, (b,), 0, ctx.schedule.num_train_timesteps)
  )

  context = text_encoder(batch["instruction_ids"])[0]
  empty, empty_pooled = text_encoder(ctx.empty_ids)
  drop_text, drop_image = conditioning_dropout(k_cond, b, cfg.cond_dropout)
  context = jnp.where(
      drop_text[:, None, None],
      jnp.broadcast_to(empty, context.shape).astype(context.dtype),
      context,
  )
  image_latents = jnp.where(drop_image[:, None, None, None], 0.0, image_latents)

  kwargs = {}
  if ctx.reward is not None:
    ids = batch["reward_ids"]  # [b, slots, 77]
    _, pooled = text_encoder(ids.reshape(-1, ids.shape[-1]))
    reward = RewardInputs(
        batch["reward_scores"].astype(jnp.float32), pooled.reshape(ids.shape[0], ids.shape[1], -1)
    )
    if ctx.reward.dropout_prob > 0:
      reward = drop_rewards(
          k_reward, reward, ctx.reward.null_reward(empty_pooled), ctx.reward.dropout_prob
      )
    if ctx.reward.text_dropout_prob > 0:  # its own key, so runs without it keep their numbers
      reward = drop_reward_texts(
          jax.random.fold_in(k_reward, 1), reward, empty_pooled, ctx.reward.text_dropout_prob
      )
    kwargs["reward"] = reward

  denoise = denoiser(unet, ctx.schedule)
  # Rollout training: some inputs made from the model's own estimate (mre/diffusion/rollout.py).
  if cfg.get("rollout_prob", 0.0) > 0:
    noisy = rollout_inputs(
        denoise,
        ctx.schedule,
        target_latents,
        noise,
        t,
        image_latents,
        context,
        jax.random.fold_in(key, 8),  # not one of the split keys: other runs keep their draws
        cfg.rollout_prob,
        cfg.get("rollout_gap", 50),
        **kwargs,
    )
  else:
    noisy = add_noise(ctx.schedule, target_latents, noise, t)
  sample = jnp.concatenate([noisy, image_latents.astype(noisy.dtype)], axis=-1)
  if self_conditioned(unet):  # the second call reads the first's x0 estimate (self_condition.py)
    kwargs["self_cond"] = training_estimate(
        denoise,
        ctx.schedule,
        sample,
        noisy,
        t,
        context,
        jax.random.fold_in(key, 7),  # not one of the split keys: other runs keep their draws
        cfg.get("self_condition_prob", 0.5),
        **kwargs,
    )
  out = denoise(sample, t, context, **kwargs).astype(jnp.float32)
  target = training_target(ctx.schedule, target_latents, noise, t)
  per_element = elementwise_loss(out - target, cfg.get("loss", "mse"), cfg.get("huber_c", 0.03))
  axes = tuple(range(1, out.ndim))
  edit_weight = cfg.get("edit_weight", 0.0)
  region_share = cfg.get("edit_region_share", 0.0)
  if region_share > 0:
    if edit_weight > 0:  # raised while tracing: once, before the first step
      raise ValueError(
          "train.edit_region_share and train.edit_weight are two ways of weighting the edited "
          "region; set one (the other to 0)"
      )
    weight = edit_region_share_weight(
        target_latents,
        source_latents,
        region_share,
        cfg.edit_threshold,
        cfg.get("edit_smoothing", 1),
    )
    per_sample = jnp.mean(weight * per_element, axis=axes)
  elif edit_weight > 0:
    weight = edit_region_weight(
        target_latents,
        source_latents,
        edit_weight,
        cfg.edit_threshold,
        cfg.get("edit_smoothing", 1),
        cfg.get("edit_dilation", 0),
        cfg.get("edit_weight_minority", False),
        estimate=(
            jax.lax.stop_gradient(predicted_x0(ctx.schedule, noisy, out, t))
            if cfg.get("edit_weight_estimate", False)
            else None
        ),
    )
    # weight is [B, H, W, 1]: its mean over the axes equals that of its broadcast over channels
    per_sample = jnp.mean(weight * per_element, axis=axes) / jnp.mean(weight, axis=axes)
  else:
    per_sample = jnp.mean(per_element, axis=axes)
  if cfg.get("edit_balance", 0.0) > 0:
    per_sample = per_sample * edit_size_balance(
        target_latents,
        source_latents,
        cfg.edit_balance,
        cfg.edit_threshold,
        cfg.get("edit_smoothing", 1),
        cfg.get("edit_balance_floor", 0.02),
    )
  if cfg.snr_gamma > 0:
    per_sample = per_sample * min_snr_weight(ctx.schedule, t, cfg.snr_gamma)
  sigma_data = getattr(getattr(unet, "config", None), "source_skip_sigma_data", 0.0)
  if cfg.get("edm_weight_cap", 0.0) > 0:
    if not sigma_data:  # raised while tracing: once, before the first step
      raise ValueError(
          "train.edm_weight_cap weights the loss of the preconditioned source skip; this U-Net "
          "has none (model.scratch.source_skip_sigma_data=0)"
      )
    per_sample = per_sample * edm_weight(ctx.schedule, t, sigma_data, cfg.edm_weight_cap)
  return jnp.mean(per_sample)


def make_train_step(ctx: StepContext, tx: optax.GradientTransformation):
  """train_step(state, batch, lr=None) -> (state, metrics); batch leaves are [accum,
  micro_batch, ...].

  Without `lr`, `tx` runs at its own schedule, computed in the program. The trainer passes `lr`
  (a float32 scalar from `lr_schedule` on the host): then nothing of the schedule (steps,
  warm-up) is a constant of the compiled program, and runs that differ only there (stage 1 and
  stage 2, a longer run, tests) share one compiled step through the persistent cache.
  """
  cfg = ctx.cfg
  schedule_fn = lr_schedule(cfg)

  def train_step(state: TrainState, batch, lr=None):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    accum = jax.tree.leaves(batch)[0].shape[0]
    grad_fn = jax.value_and_grad(lambda p, mb, k: micro_loss(ctx, p, mb, k))

    def body(carry, xs):
      loss_sum, grad_sum = carry
      mb, i = xs
      loss, grads = grad_fn(state.params, mb, jax.random.fold_in(key, i))
      return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    if accum == 1:  # no loop: XLA optimises the convolutions of a loop body less well
      loss, grads = grad_fn(
          state.params, jax.tree.map(lambda x: x[0], batch), jax.random.fold_in(key, 0)
      )
    else:
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (loss, grads), _ = jax.lax.scan(body, (jnp.float32(0.0), zeros), (batch, jnp.arange(accum)))
      loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
    grad_norm = optax.tree.norm(grads)
    step_tx = tx if lr is None else make_optimizer(cfg, learning_rate=lr)
    updates, opt_state = step_tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(state.step, cfg.train.ema_decay)
    ema = jax.tree.map(lambda e, p: e * decay + p.astype(e.dtype) * (1 - decay), state.ema, params)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        ema=keep(ema, state.ema),
        opt_state=keep(opt_state, state.opt_state),
        rng=state.rng,
    )
    rate = schedule_fn(state.step) if lr is None else lr
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": rate, "finite": ok}
    return new_state, metrics

  return train_step
