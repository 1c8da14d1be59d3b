"""The SmartEdit-style editor's training step: LM cross-entropy + diffusion loss, as the release.

One pass per batch (configs/smartedit.py has the recipe):

  CLIP patches (frozen tower) -> the conversation with its answer, teacher-forced through the
  LLM (LoRA) -> LM cross-entropy on the answer tokens, and the final-norm states at the 32
  `<img_k>` inputs -> Q-Former -> BIM -> U-Net context and conv_in map -> the InstructPix2Pix
  denoising loss on the edited image's latents, with the release's conditioning dropout
  -> loss = lm_weight * CE + diffusion_weight * MSE.

Trained (`trained` names, the release's split): `unet`, `lora` (the adapters' weights),
`embeddings` (the LLM's embedding and lm_head matrices; after every update the original
vocabulary's rows are put back, so only the added tokens' rows learn, as the release does),
`sd_qformer`, `bim`. Everything else (the LLaMA base weights, vision tower, projector, VAE) is
frozen: it gets no gradient and no optimizer state. A model trained from scratch (the toy world)
has no pretrained LLM or CLIP to keep: `llm` (every LLM weight, all vocabulary rows),
`vision_tower` and `mm_projector` train them too.

The U-Net is called through `denoiser`, so a toy U-Net with the source skip (`mre_source_skip`) is
trained as the samplers call it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mre import sharding
from mre.diffusion.schedule import NoiseSchedule, add_noise, training_target
from mre.diffusion.self_condition import predicted_x0
from mre.diffusion.source_skip import denoiser
from mre.models.lora import LoRAParam
from mre.models.smartedit import ConditionedUNet, SmartEdit, release_condition_dropout
from mre.models.smartedit_prompt import IGNORE
from mre.train_step import edit_region_weight

TRAINABLE = ("unet", "lora", "embeddings", "sd_qformer", "bim")
# From scratch only: the whole LLM, the vision tower, the projector.
SCRATCH_TRAINABLE = ("llm", "vision_tower", "mm_projector")


def _embedding_matrix(path, value) -> bool:
  del value
  names = tuple(str(p) for p in path)
  return names[:1] == ("llm",) and (
      names[-2:] == ("embed_tokens", "embedding") or names[-2:] == ("lm_head", "kernel")
  )


# What the alignment stage does not train (the rest of `TRAINABLE + SCRATCH_TRAINABLE` it does).
NOT_ALIGNED = ("unet", "bim")


def _part(path) -> str:
  """The top-level part (`unet`, `llm`, ...) of a parameter's pytree path."""
  return str(getattr(path[0], "key", path[0]))


def trained_filter(trained: Sequence[str]):
  """The NNX filter of the parameters a SmartEdit step trains (`TRAINABLE` names)."""
  unknown = sorted(set(trained) - set(TRAINABLE + SCRATCH_TRAINABLE))
  if unknown:
    raise ValueError(
        f"unknown trained part(s) {unknown}; choose from {TRAINABLE + SCRATCH_TRAINABLE}"
    )
  filters = []
  for name in trained:
    if name == "lora":
      filters.append(LoRAParam)
    elif name == "embeddings":
      filters.append(_embedding_matrix)
    else:
      filters.append(lambda path, value, name=name: bool(path) and str(path[0]) == name)
  if not filters:
    raise ValueError("model.smartedit.trained is empty: nothing would be trained")
  return nnx.All(nnx.Param, nnx.Any(*filters))


def splice_labels(ids, labels, num_patches: int, placeholder: int):
  """The LM labels [B, T] laid out as `splice_image` lays out the ids: the first `placeholder` of
  each row replaced by `num_patches` positions that have no target. Returns [B, T - 1 + N]."""
  b, t = ids.shape
  p = jnp.argmax(ids == placeholder, axis=1)[:, None]
  j = jnp.arange(t - 1 + num_patches)[None]
  at_image = (j >= p) & (j < p + num_patches)
  src = jnp.clip(jnp.where(j < p, j, j - num_patches + 1), 0, t - 1)
  return jnp.where(at_image, IGNORE, jnp.take_along_axis(labels, src, axis=1))


def lm_cross_entropy(logits, labels):
  """Next-token cross-entropy (float32), averaged over the positions with a target: logits at
  position i predict labels at i + 1 (the labels are the answer's own ids, unshifted)."""
  logits = logits[:, :-1].astype(jnp.float32)
  target = labels[:, 1:]
  valid = target != IGNORE
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, target, 0))
  return jnp.sum(jnp.where(valid, per_token, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def _language_pass(model: SmartEdit, batch: dict):
  """(CLIP patches, the `<img_k>` states, LM cross-entropy) of the teacher-forced conversation:
  what both stages' losses start from. The patches' gradient is stopped (the release's tower is
  frozen)."""
  patches = jax.lax.stop_gradient(model.image_features(batch["clip_pixels"]))
  states, logits, _, _ = model.teacher_forced(patches, batch["input_ids"], batch["attention_mask"])
  labels = splice_labels(
      batch["input_ids"], batch["labels"], patches.shape[1], model.config.tokens.first_img
  )
  return patches, states, lm_cross_entropy(logits, labels)


@dataclasses.dataclass(frozen=True)
class SmartEditLossConfig:
  lm_weight: float = 1.0
  diffusion_weight: float = 1.0
  cond_dropout: float = 0.05  # the release's p: text dropped if r < 2p, image if p <= r < 3p
  # Ours, for the toy (the release's MSE is plain): the InstructPix2Pix toy recipe's weight
  # 1 + edit_weight on the region the edit changes (`train_step.edit_region_weight`), without
  # which object edits are a few percent of the loss and are not learned.
  edit_weight: float = 0.0
  edit_threshold: float = 0.25
  edit_minority: bool = False
  edit_estimate: bool = False  # the weight also where the model's own estimate changes the source
  # The release's stage 1 (textual alignment, `train/TrainStage1.py`): the weight of the MSE
  # between the Q-Former's output and the frozen CLIP text encoder's last hidden state of the
  # same text, beside the LM cross-entropy (`smartedit_align_loss`).
  align_weight: float = 1.0
  # Ours: the same MSE kept in the SmartEdit stage at this weight (0: the release's plain stage 2),
  # so that the diffusion loss cannot pull the Q-Former away from the context the U-Net learned
  # to read; the batch then carries `align_context` in that stage too.
  edit_align_weight: float = 0.0


def _align_mse(query, batch) -> jax.Array:
  """MSE between the Q-Former's output and the batch's frozen CLIP context of the instruction."""
  target = jax.lax.stop_gradient(batch["align_context"].astype(jnp.float32))
  if query.shape != target.shape:
    raise ValueError(
        f"the Q-Former's output {query.shape} and the CLIP text context {target.shape} differ: "
        "alignment needs as many queries as CLIP text tokens, of the same width"
    )
  return jnp.mean((query.astype(jnp.float32) - target) ** 2)


def smartedit_loss(
    model: SmartEdit,
    schedule: NoiseSchedule,
    batch: dict,
    key,
    null_context,
    config: SmartEditLossConfig = SmartEditLossConfig(),
    reward=None,
):
  """(loss, {"lm": CE, "diffusion": MSE}, and "align" with `config.edit_align_weight`) of one
  batch.

  batch: `clip_pixels` [B, S, S, 3] (CLIP-normalised), `input_ids`, `attention_mask`, `labels`
  [B, T] (right-padded, `prompt_batch(answer=True)`), `target_latents` (the edited image's,
  scaled as the U-Net sees them) and `image_latents` (the source's, unscaled), [B, h, w, c];
  optional `noise` and `timesteps` fix the draws. null_context: the empty prompt's CLIP text
  context [1, 77, D]. reward: `RewardInputs` for a RewardUNet.
  """
  k_noise, k_t, k_drop = jax.random.split(key, 3)
  patches, states, lm = _language_pass(model, batch)

  target = batch["target_latents"]
  image = source = batch["image_latents"]  # source: before the dropout, for the edit region
  query = model.sd_qformer(states)
  context, residual = model.bim(query, patches, target.shape[1:3])  # = model.condition(...)
  noise = batch.get("noise")
  if noise is None:
    noise = jax.random.normal(k_noise, target.shape, jnp.float32)
  t = batch.get("timesteps")
  if t is None:
    t = jax.random.randint(k_t, (target.shape[0],), 0, schedule.num_train_timesteps)
  context, image = release_condition_dropout(
      k_drop, context, null_context, image, config.cond_dropout
  )
  noisy = add_noise(schedule, target, noise, t)
  sample = jnp.concatenate([noisy, image.astype(noisy.dtype)], axis=-1)
  unet = ConditionedUNet(model.unet)
  out = denoiser(unet, schedule)(sample, t, context, conv_in_residual=residual, reward=reward)
  error = (out.astype(jnp.float32) - training_target(schedule, target, noise, t)) ** 2
  if config.edit_weight > 0:
    estimate = None
    if config.edit_estimate:
      estimate = jax.lax.stop_gradient(predicted_x0(schedule, noisy, out.astype(jnp.float32), t))
    weight = edit_region_weight(
        target,
        source,
        config.edit_weight,
        config.edit_threshold,
        minority=config.edit_minority,
        estimate=estimate,
    )
    axes = tuple(range(1, error.ndim))  # each sample normalised by its weights, as the IP2P step
    diffusion = jnp.mean(jnp.mean(weight * error, axis=axes) / jnp.mean(weight, axis=axes))
  else:
    diffusion = jnp.mean(error)
  loss = config.lm_weight * lm + config.diffusion_weight * diffusion
  parts = {"lm": lm, "diffusion": diffusion}
  if config.edit_align_weight > 0:
    parts["align"] = _align_mse(query, batch)
    loss = loss + config.edit_align_weight * parts["align"]
  return loss, parts


def smartedit_align_loss(
    model: SmartEdit, batch: dict, config: SmartEditLossConfig = SmartEditLossConfig()
):
  """(loss, {"lm": CE, "align": MSE}) of one batch of the alignment stage.

  The release trains its Q-Former in a stage of its own before SmartEdit training: the LM
  cross-entropy on the answer plus the MSE between the Q-Former's output and the frozen CLIP text
  encoder's last hidden state of the same text, so that the U-Net, trained on CLIP's context,
  reads the Q-Former's from the first SmartEdit step. Here the Q-Former reads the states at the
  `<img_k>` tokens of the editing conversation (the path SmartEdit training and editing use; the
  release's stage 1 reads a caption prompt's states) and the CLIP text is the instruction.
  batch: as `smartedit_loss`'s, plus `align_context` [B, L, D], the CLIP context of the
  instruction (computed outside the step: the text encoder is frozen). No U-Net, no BIM.
  """
  _, states, lm = _language_pass(model, batch)
  align = _align_mse(model.sd_qformer(states), batch)
  return config.lm_weight * lm + config.align_weight * align, {"lm": lm, "align": align}


def restore_original_rows(params: nnx.State, original: nnx.State, num_original: int) -> nnx.State:
  """The embedding and lm_head matrices with their first `num_original` vocabulary rows (the
  base LLM's) taken from `original`: only the added tokens' rows keep their update."""

  def fix(path, new, old):
    if not _embedding_matrix(path, None):
      return new
    axis = 0 if str(path[-1]) == "embedding" else 1  # embedding [V, D]; lm_head kernel [D, V]
    keep = jnp.arange(new.shape[axis]) < num_original
    keep = keep[:, None] if axis == 0 else keep[None, :]
    return jnp.where(keep, old, new)

  flat_new = dict(nnx.to_flat_state(params))
  flat_old = dict(nnx.to_flat_state(original))
  for path, var in flat_new.items():
    if path in flat_old:
      var.set_value(fix(path, var.get_value(), flat_old[path].get_value()))
  return params


@dataclasses.dataclass
class SmartEditTrainer:
  """One compiled step over the trained parameters only. `step(batch, key) -> metrics` updates
  `model` in place (its trained parameters); `null_context` as in `smartedit_loss`.

  With `accum` > 1 every batch leaf has a leading axis of `accum` micro-batches: their gradients
  are averaged (a scan, so one micro-batch's activations are alive at a time) and each draws its
  noise, timesteps and dropout from `fold_in(key, i)`. With `mesh`, every parameter (trained or
  frozen: the 7B base weights too), the optimizer state and the kept vocabulary rows are placed by
  `sharding.tree_shardings` (fsdp over the largest divisible axis from `min_size` elements, the
  LLM's heads and MLP columns over "tensor"), and the step keeps them there; the batch must come
  sharded over ("data", "fsdp") (`sharding.global_batch`)."""

  model: SmartEdit
  schedule: NoiseSchedule
  tx: optax.GradientTransformation
  null_context: jax.Array
  trained: Sequence[str] = TRAINABLE
  loss_config: SmartEditLossConfig = SmartEditLossConfig()
  reward_fn: Optional[callable] = None  # (model, batch) -> RewardInputs, for a RewardUNet
  # The alignment stage's optimizer (its own schedule over its own steps; None: `tx`). Its state
  # has `tx`'s structure; `start_smartedit` starts `tx` afresh, as the release's stage 2 starts.
  align_tx: Optional[optax.GradientTransformation] = None
  accum: int = 1
  mesh: Optional[jax.sharding.Mesh] = None
  min_size: int = 2**20  # the smallest array fsdp splits (`mesh.fsdp_min_size`)

  def __post_init__(self):
    if self.accum < 1:
      raise ValueError(f"accum={self.accum}: must be >= 1")
    self.filter = trained_filter(self.trained)
    # With the whole LLM trained (from scratch) every vocabulary row learns: none is put back.
    self.keep_original_rows = "llm" not in self.trained
    self.graphdef, self.params, self.rest = nnx.split(self.model, self.filter, ...)
    rows = nnx.state(self.model, _embedding_matrix)
    # A copy the donated step cannot invalidate; on a mesh made through host memory and placed
    # split, so no device ever holds the whole matrices a second time.
    self.original_rows = jax.tree.map(jnp.copy if self.mesh is None else np.array, rows)
    jit = functools.partial(jax.jit, donate_argnums=(0, 1))
    self._opt_shardings = None
    if self.mesh is not None:
      place = lambda tree: jax.device_put(tree, self._shardings(tree))  # noqa: E731
      self.params, self.rest = place(self.params), place(self.rest)
      self.original_rows = place(self.original_rows)
      nnx.update(self.model, self.params, self.rest)  # the model itself holds the placed arrays
      self._opt_shardings = self._shardings(jax.eval_shape(self.tx.init, self.params))
      out = (self._shardings(self.params), self._opt_shardings, sharding.replicated(self.mesh))
      jit = functools.partial(jit, out_shardings=out)
    self.opt_state = self._new_opt_state(self.align_tx or self.tx)
    self._step = jit(functools.partial(self._update, False))
    self._align_step = jit(functools.partial(self._update, True))

  def _shardings(self, tree):
    return sharding.tree_shardings(self.mesh, tree, self.min_size)

  def _new_opt_state(self, tx):
    """`tx`'s state for the parameters; on a mesh created sharded, never whole on one device
    (both stages' optimizers have the same state structure)."""
    if self._opt_shardings is None:
      return tx.init(self.params)
    return jax.jit(tx.init, out_shardings=self._opt_shardings)(self.params)

  def _gradients(self, align, params, rest, batch, key):
    """((loss, parts), grads) of one batch; averaged over the micro-batches with `accum` > 1."""

    def loss_fn(p, batch, key):
      model = nnx.merge(self.graphdef, p, rest)
      if align:
        return smartedit_align_loss(model, batch, self.loss_config)
      reward = None if self.reward_fn is None else self.reward_fn(model, batch)
      return smartedit_loss(
          model, self.schedule, batch, key, self.null_context, self.loss_config, reward
      )

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if self.accum == 1:
      return grad_fn(params, batch, key)

    def body(total, xs):
      micro, i = xs
      out, grads = grad_fn(params, micro, jax.random.fold_in(key, i))
      return jax.tree.map(jnp.add, total, grads), out

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (loss, parts) = jax.lax.scan(body, zeros, (batch, jnp.arange(self.accum)))
    mean = lambda tree: jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)  # noqa: E731
    return (mean(loss), mean(parts)), jax.tree.map(lambda g: g / self.accum, grads)

  def _update(self, align, params, opt_state, rest, original_rows, batch, key):
    # In the alignment stage the U-Net and the BIM get zero gradients; its optimizer's state has
    # the SmartEdit stage's structure, so one checkpoint layout serves both stages.
    (loss, parts), grads = self._gradients(align, params, rest, batch, key)
    tx = (self.align_tx or self.tx) if align else self.tx
    updates, opt_state = tx.update(grads, opt_state, params)
    if align:  # no weight decay either: the alignment stage leaves the U-Net and BIM as they are
      updates = jax.tree_util.tree_map_with_path(
          lambda path, u: jnp.zeros_like(u) if _part(path) in NOT_ALIGNED else u, updates
      )
    params = optax.apply_updates(params, updates)
    if self.keep_original_rows:
      params = restore_original_rows(params, original_rows, self.model.config.tokens.img)
    return params, opt_state, {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads)}

  def start_smartedit(self):
    """The optimizer state of the SmartEdit stage, fresh (its schedule from its first step; Adam's
    moments of the U-Net and BIM, which got no gradient in alignment, without a stale count)."""
    self.opt_state = self._new_opt_state(self.tx)

  def step(self, batch, key, *, align: bool = False) -> dict:
    """One update; `align`: of the alignment stage (`smartedit_align_loss`, needs the batch's
    `align_context`) instead of SmartEdit's."""
    fn = self._align_step if align else self._step
    self.params, self.opt_state, metrics = fn(
        self.params, self.opt_state, self.rest, self.original_rows, batch, key
    )
    nnx.update(self.model, self.params)
    return metrics


__all__ = [
    "SmartEditLossConfig",
    "SmartEditTrainer",
    "SCRATCH_TRAINABLE",
    "TRAINABLE",
    "lm_cross_entropy",
    "restore_original_rows",
    "smartedit_align_loss",
    "smartedit_loss",
    "splice_labels",
    "trained_filter",
]
