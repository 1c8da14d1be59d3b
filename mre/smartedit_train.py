"""Training the SmartEdit-style editor: `python -m mre.train --config=configs/smartedit.py:toy`.

`mre.train.train` hands a `model.family='smartedit'` config to `train(config)` here. The pieces
are the InstructPix2Pix trainer's: the dataset and its resumable iterator (`mre.data.train_input`),
Orbax checkpoints of the train state and the iterator position (`mre.checkpointing`; a rerun
resumes exactly), the validation grid and the toy judge every `train.validate_every` steps
(`mre.validation`, with a `SmartEditor`). The step is `SmartEditTrainer`'s (LM cross-entropy +
diffusion loss, `mre/smartedit_train_step.py`); each example's conversation is the release's with
the instruction in it and the answer's 32 `<img_k>` tokens teacher-forced. At the end the model is
exported as an editor folder (`mre.smartedit_setup.export_editor`) that `mre.edit` and `mre.eval`
open. The toy runs on one device.

The release sizes (`model.smartedit.size` '7b'/'13b') train from a SmartEdit folder
(`model.pretrained`, mre/smartedit_release.py) in latent space (the folder's VAE encodes the
images in the input step), over the ("data", "fsdp", "tensor") mesh of `config.mesh`: every weight
sharded by `mre.sharding`'s rules, the batch over data x fsdp, `train.grad_accum` micro-batches
per update, the per-device memory estimate of `mre.smartedit_dryrun` printed first. No EMA (the
release keeps none).

With `model.reward.enabled` the U-Net is a `RewardUNet` and each example's three scores and
failure texts condition it (the paper's SmartEdit row): the texts are tokenised for CLIP and pooled
by the frozen CLIP text encoder before the step. The trainer runs its modules in eval mode, so
dropout layers (LoRA's, the released reward form's attention) stay off.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from mre import checkpointing, model_setup, sharding, smartedit_dryrun, smartedit_release
from mre import smartedit_setup, validation
from mre.data import train_input
from mre.diffusion.condition_dropout import drop_reward_texts, drop_rewards
from mre.diffusion.schedule import schedule_from_config
from mre.model_io.smartedit_folder import EDITOR_JSON
from mre.models.reward_config import RewardInputs
from mre.models.pixel import PixelSpace
from mre.models.smartedit import clip_pixels
from mre.models.smartedit_prompt import prompt_batch
from mre.pipeline import tokenize
from mre.smartedit_editor import SmartEditSettings
from mre.smartedit_train_step import SmartEditLossConfig, SmartEditTrainer
from mre.train_step import NonFiniteError, StepTimer, log_metrics, lr_schedule, make_optimizer


class PromptIds:
  """Instruction texts -> the teacher-forced conversations as one int array [B, 3 L (+ C)]: the
  ids, the attention mask and the LM labels side by side (`split_prompt` takes them apart), and
  with `clip_tokenize` the instruction's CLIP ids [B, C] after them (for the alignment stage), so
  the input pipeline carries them where it carries CLIP ids. `encode`: text -> LLM ids without
  special tokens (the pipeline's). Rows are remembered per instruction."""

  def __init__(self, encode, tokens, length: int, template, clip_tokenize=None):
    self.encode, self.tokens, self.length, self.template = encode, tokens, length, template
    self.clip_tokenize = clip_tokenize
    self._cache = {}

  def __call__(self, texts):
    texts = list(texts)
    missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
    if missing:
      try:
        b = prompt_batch(
            missing,
            self.encode,
            answer=True,
            ids=self.tokens,
            template=self.template,
            length=self.length,
        )
      except ValueError as e:
        if "more than length" not in str(e):
          raise
        raise ValueError(f"{e}: raise model.smartedit.max_prompt_tokens") from None
      parts = [b.input_ids, b.attention_mask.astype(np.int32), b.labels]
      if self.clip_tokenize is not None:
        parts.append(np.asarray(self.clip_tokenize(missing), np.int32))
      rows = np.concatenate(parts, axis=1)
      self._cache.update(zip(missing, rows))
    return np.stack([self._cache[t] for t in texts])


def split_prompt(packed, length: int) -> dict:
  """`PromptIds`' rows [B, 3 L (+ C)] -> input_ids, attention_mask, labels [B, L] (and
  clip_ids [B, C] when the rows carry them)."""
  out = {
      "input_ids": packed[..., :length],
      "attention_mask": packed[..., length : 2 * length].astype(bool),
      "labels": packed[..., 2 * length : 3 * length],
  }
  if packed.shape[-1] > 3 * length:
    out["clip_ids"] = packed[..., 3 * length :]
  return out


def _images(fn, x):
  """`fn` over images [..., H, W, C] with any leading axes (the accumulation axis too)."""
  y = fn(x.reshape(-1, *x.shape[-3:]))
  return y.reshape(*x.shape[:-3], *y.shape[1:])


def step_batch(raw: dict, length: int, clip_size: int, accum: int = 1) -> dict:
  """A pipeline batch [accum, B, ...] -> `smartedit_loss`'s batch ([B, ...] when `accum` is 1,
  else [accum, B, ...] for `SmartEditTrainer(accum=...)`); the images still pixels (in pixel
  space they are the latents; `encode_latents` makes the VAE's), the reward's scores and text ids
  carried as they are (the trainer pools the texts)."""
  pick = (lambda x: x[0]) if accum == 1 else (lambda x: x)  # noqa: E731
  original, edited = pick(raw["original"]), pick(raw["edited"])
  return {
      "clip_pixels": _images(lambda x: clip_pixels(x, clip_size), original),
      **split_prompt(pick(raw["instruction_ids"]), length),
      "target_latents": edited,
      "image_latents": original,
      **{k: pick(raw[k]) for k in ("reward_scores", "reward_ids") if k in raw},
  }


def encode_latents(vae, batch: dict, key) -> dict:
  """The batch's images as the VAE's latents, as the InstructPix2Pix step takes them: the edited
  image's sampled and scaled, the source's mode unscaled (the VAE is frozen: no gradient)."""
  sample = lambda x: vae.scale_latents(vae.encode(x).sample(key))  # noqa: E731
  target = _images(sample, batch["target_latents"])
  source = _images(lambda x: vae.encode(x).mode(), batch["image_latents"])
  stop = jax.lax.stop_gradient
  return {**batch, "target_latents": stop(target), "image_latents": stop(source)}


def pooled_reward_texts(text_encoder, reward_ids):
  """The failure texts' ids [..., slots, L] -> CLIP's pooled features [..., slots, D]."""
  lead, length = reward_ids.shape[:-1], reward_ids.shape[-1]
  _, pooled = text_encoder(reward_ids.reshape(-1, length))
  return pooled.reshape(*lead, -1)


_REWARD_KEY = 0x5EED  # folded into a step's key for its reward dropout
_LATENT_KEY = 0x1A7E  # ... and for the edited image's latent sample


def reward_dropout(config, pipe):
  """`(key, reward) -> reward` with `model.reward.dropout_prob` (whole rewards become the null
  reward: reward guidance at inference) and `text_dropout_prob` (single failure texts become the
  empty text) applied, as the InstructPix2Pix step does; None when both are 0. The empty text is
  pooled by the frozen CLIP text encoder once."""
  r = config.model.reward
  if not (r.dropout_prob or r.text_dropout_prob):
    return None
  _, empty_pooled = pipe.text_encoder(jnp.asarray(tokenize(pipe.tokenizer, [""])))
  null = model_setup.reward_config(config).null_reward(empty_pooled)

  @jax.jit
  def apply(key, reward):
    reward = drop_rewards(key, reward, null, r.dropout_prob)
    return drop_reward_texts(jax.random.fold_in(key, 1), reward, empty_pooled, r.text_dropout_prob)

  return apply


def batch_reward(model, batch) -> RewardInputs:
  """The trainer's `reward_fn`: the batch's scores and pooled failure texts."""
  del model
  return RewardInputs(batch["reward_scores"].astype(jnp.float32), batch["reward_text"])


def train_state(trainer: SmartEditTrainer, step: int) -> dict:
  """What a checkpoint holds: the trained parameters, the optimizer state, the step."""
  return {"step": jnp.int32(step), "params": trainer.params, "opt_state": trainer.opt_state}


def _validation(config, toy, source):
  """(grid, judge) of the IP2P trainer, editing with a `SmartEditor` (the LLM generating its
  answer at `model.smartedit.temperature`); (None, None) without validation."""
  if not config.train.validate_every:
    return None, None
  base = validation.validation_settings(config)
  settings = SmartEditSettings(
      **{f: getattr(base, f) for f in base.__dataclass_fields__},
      temperature=config.model.smartedit.temperature,
  )
  grid = validation.validation_grid(config, toy.pipe, source, settings)
  judged = validation.validation_judge(config, toy.pipe, source, settings)
  return grid, judged


def _validate(grid, judged, trainer, step, workdir, writer) -> dict:
  """The IP2P trainer's validation; a model whose LLM does not yet answer all `<img_k>` tokens
  cannot edit (as in the release), which is reported and recorded instead."""
  try:
    return validation.validate(grid, judged, {"model": trainer.params}, step, workdir, writer)
  except ValueError as e:
    if "<img_k>" not in str(e):
      raise
    tqdm.write(f"step {step} validation skipped: {e}")
    logging.warning("step %d validation skipped: %s", step, e)
    return {"step": step, "validation": {}, "skipped": str(e)}


def _finite(metrics, step: int, checkpoints: str) -> dict:
  """The step's metrics as floats; a non-finite loss stops the run. `SmartEditTrainer` has
  applied that step's update already, so the last good state is the last checkpoint's."""
  m = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not np.isfinite(m["loss"]):
    raise NonFiniteError(
        f"step {step}: loss={m['loss']} ({', '.join(f'{k} {v}' for k, v in m.items())}) is not "
        f"finite; training stopped. Checkpoints in {checkpoints} hold the last saved state. "
        "Lower train.lr or check the data."
    )
  return m


def stage_configs(config):
  """(alignment, SmartEdit) copies of `config`, each with its own learning-rate schedule over
  its own steps: the first `model.smartedit.align_steps` of `train.steps`, and the rest."""
  align_steps = min(int(config.model.smartedit.align_steps), int(config.train.steps))
  align, smartedit = config.copy_and_resolve_references(), config.copy_and_resolve_references()
  align.train.steps = align_steps
  smartedit.train.steps = config.train.steps - align_steps
  return align, smartedit


def _mesh(config):
  """The release sizes' mesh (`config.mesh`); None for the toy."""
  if config.model.smartedit.size == "toy":
    return None
  sharding.maybe_initialize_distributed(config.distributed)
  if jax.process_count() > 1:
    raise ValueError(
        f"{jax.process_count()} processes: training the release-size SmartEdit over several "
        "hosts is not built (the export and summaries would be written by every process, and "
        "each host would draw the same latent noise and dropout); run it on one host, over its "
        "devices (config.mesh)"
    )
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.get("tensor", 1))
  logging.info("mesh %s over %d devices", dict(mesh.shape), jax.device_count())
  return mesh


def _print_estimate(config, mesh, pipe):
  """The per-device memory of the loaded model's parameters and optimizer state on `mesh`
  (`mre.smartedit_dryrun`'s estimate, with the folder's sizes), before anything is placed."""
  if jax.process_index() == 0:
    width = pipe.model.config.llm.hidden_size
    name = {4096: "7B", 5120: "13B"}.get(
        width, f"LLM width {width}"
    ) + f" from {config.model.pretrained}"
    frozen = {n: getattr(pipe, n) for n in smartedit_dryrun.REPLICATED}
    parts = smartedit_dryrun.model_parts(pipe.model, **frozen)
    print(smartedit_dryrun.report(config, mesh.shape["fsdp"], mesh.shape["tensor"], parts, name))


def _micro_dropout(dropout, key, reward, accum: int):
  """Reward dropout per sample of each micro-batch (`accum` > 1: leaves [accum, B, ...])."""
  if accum == 1:
    return dropout(key, reward)
  parts = [
      dropout(jax.random.fold_in(key, i), jax.tree.map(lambda x, i=i: x[i], reward))
      for i in range(accum)
  ]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *parts)


def train(config) -> dict:
  """Runs (or resumes) the SmartEdit training run `config` describes; returns a summary dict."""
  why = smartedit_setup.refusal(config)
  if why:
    raise ValueError(why)
  t, s = config.train, config.model.smartedit
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  mesh = _mesh(config)

  source = train_input.open_dataset(config)
  if mesh is None:
    toy = smartedit_setup.build_toy(config, source.vocabulary, workdir)
    export = lambda folder, step: smartedit_setup.export_editor(toy, folder, step)  # noqa: E731
    per_host = t.batch_per_device
  else:
    toy = smartedit_release.build_release(config)
    _print_estimate(config, mesh, toy.pipe)
    for name in smartedit_dryrun.REPLICATED:  # read on the host: whole onto every device
      frozen = getattr(toy.pipe, name)
      nnx.update(frozen, jax.device_put(nnx.state(frozen), sharding.replicated(mesh)))
    export = lambda folder, step: smartedit_release.export_release(toy, folder, step)  # noqa: E731
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]  # "tensor" shares each example
    per_host = t.batch_per_device * batch_devices // jax.process_count()
  accum = int(t.grad_accum)
  pipe, model = toy.pipe, toy.pipe.model
  cfg = model.config
  length = s.max_prompt_tokens
  align_steps = int(s.align_steps)
  if align_steps < 0:
    raise ValueError(f"model.smartedit.align_steps={align_steps}: must be >= 0")
  edit_align = float(s.edit_align_loss_weight)  # >= 0: `refusal` checked it
  prompts = PromptIds(
      pipe.encode,
      cfg.tokens,
      length,
      pipe.template,
      clip_tokenize=train_input.TokenizeFn(pipe.tokenizer) if align_steps or edit_align else None,
  )
  reward_cfg = model_setup.reward_config(config)
  data = train_input.TrainIterator(
      source,
      config,
      None,
      batch_size=per_host,
      accum=accum,
      reward=reward_cfg,
      tokenize_fn=prompts,
      reward_tokenize_fn=train_input.TokenizeFn(pipe.tokenizer) if reward_cfg else None,
  )
  align_config, smartedit_config = stage_configs(config)
  trainer = SmartEditTrainer(
      model,
      schedule_from_config(pipe.scheduler_config),
      make_optimizer(smartedit_config),
      pipe.null_context,
      trained=tuple(s.trained),
      loss_config=SmartEditLossConfig(
          s.lm_loss_weight,
          s.diffusion_loss_weight,
          t.cond_dropout,
          edit_weight=t.edit_weight,
          edit_threshold=t.edit_threshold,
          edit_minority=t.edit_weight_minority,
          edit_estimate=t.edit_weight_estimate,
          align_weight=s.align_loss_weight,
          edit_align_weight=edit_align,
      ),
      reward_fn=batch_reward if reward_cfg else None,
      align_tx=make_optimizer(align_config) if align_steps else None,
      accum=accum,
      mesh=mesh,
      min_size=config.mesh.fsdp_min_size,
  )
  n_trained = sum(x.size for x in jax.tree.leaves(trainer.params))
  n_all = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  logging.info("SmartEdit %s: %d parameters, %d trained (%s)", s.size, n_all, n_trained, s.trained)

  ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints, async_save=t.async_checkpoints
  )
  start_step = 0
  if ckpt.latest_step() is not None:
    state, data_state = ckpt.restore(checkpointing.abstract_like(train_state(trainer, 0)))
    trainer.params, trainer.opt_state = state["params"], state["opt_state"]
    nnx.update(model, trainer.params)
    data.set_state(data_state)
    start_step = int(state["step"])
    logging.info("resumed from %s at step %d", ckpt.directory, start_step)
    print(f"resuming from step {start_step} ({ckpt.directory})")

  export_dir = os.path.join(workdir, "export")
  exported = os.path.exists(os.path.join(export_dir, EDITOR_JSON))  # written last by the export
  if start_step >= t.steps and (not t.export or exported):
    ckpt.close()
    data.close()
    print(f"nothing to do: {workdir} is already at step {start_step} of {t.steps}")
    summary = checkpointing.run_summary(workdir, start_step, start_step, [], [])
    return {**summary, **({"export": export_dir} if t.export else {})}

  to_step = jax.jit(lambda raw: step_batch(raw, length, cfg.vision.image_size, accum))
  pool = nnx.jit(pooled_reward_texts)
  clip_context = nnx.jit(lambda encoder, ids: encoder(ids.reshape(-1, ids.shape[-1]))[0])
  latents = None if isinstance(pipe.vae, PixelSpace) else nnx.jit(encode_latents)
  base_key = jax.random.key(config.seed)
  dropout = reward_dropout(config, pipe) if reward_cfg is not None else None

  def prepare(raw, step):
    batch = to_step(raw)
    key = jax.random.fold_in(base_key, step)  # the step number alone: a resume draws the same
    if step < align_steps:  # no reward in the alignment stage
      for k in ("reward_scores", "reward_ids"):
        batch.pop(k, None)
    if mesh is not None:  # global arrays over ("data", "fsdp") first, so that the frozen
      # encoders below run on each device's share of the batch, not on all of it everywhere
      batch = sharding.global_batch(mesh, jax.device_get(batch), leading_unsharded=int(accum > 1))
    if latents is not None:  # the frozen VAE, outside the trained step
      batch = latents(pipe.vae, batch, jax.random.fold_in(key, _LATENT_KEY))
    clip_ids = batch.pop("clip_ids", None)
    if step < align_steps or edit_align:  # the instruction's context from frozen CLIP
      context = clip_context(pipe.text_encoder, clip_ids)
      batch["align_context"] = context.reshape(*clip_ids.shape, -1)
    if "reward_ids" not in batch:
      return batch
    # The failure texts pooled by the frozen CLIP text encoder, outside the trained step.
    ids = batch.pop("reward_ids")
    reward = RewardInputs(batch.pop("reward_scores"), pool(pipe.text_encoder, ids))
    if dropout is not None:
      reward = _micro_dropout(dropout, jax.random.fold_in(key, _REWARD_KEY), reward, accum)
    batch["reward_scores"], batch["reward_text"] = reward.scores, reward.text
    return batch

  rates = np.concatenate(
      [
          np.asarray(jax.vmap(lr_schedule(c))(jnp.arange(c.train.steps)), np.float32)
          for c in (align_config, smartedit_config)
          if c.train.steps > 0
      ]
      or [np.zeros(1, np.float32)]
  )
  from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

  writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
  grid, judged = _validation(config, toy, source)
  history, validations, step, stopped = [], [], start_step, None
  timer = StepTimer(start_step)
  try:
    with (
        checkpointing.StopSignal() as stop,
        tqdm(total=t.steps, initial=start_step, desc="train", unit="step") as bar,
    ):
      while step < t.steps:
        align = step < align_steps
        if step == align_steps and align_steps:
          trainer.start_smartedit()
          tqdm.write(f"step {step}: alignment stage done, SmartEdit training from here")
        batch = prepare(data.next(), step)
        # The step's key from the step number alone: a resumed run draws what the first would.
        metrics = trainer.step(batch, jax.random.fold_in(base_key, step), align=align)
        step += 1
        bar.update(1)
        m = _finite(metrics, step, ckpt.directory)
        if step % t.log_every == 0 or step == t.steps:
          dt = timer.per_step(step)
          images = per_host * jax.process_count() * accum
          m.update(lr=float(rates[step - 1]), step_time=dt, images_per_s=images / dt)
          second = "align" if align else "diffusion"
          kept = ("align",) if not align and "align" in m else ()  # edit_align_loss_weight
          log_metrics(history, writer, step, m, ("loss", "lm", second, *kept, "grad_norm", "lr"))
          bar.set_postfix({"lm": f"{m['lm']:.3f}", second: f"{m[second]:.4f}"})
        stopped = ckpt.stop_reason(stop, step)
        if step % t.checkpoint_every == 0 or step == t.steps or stopped:
          ckpt.save(step, train_state(trainer, step), data.get_state(), force=True)
        if stopped:
          break
        if grid is not None and step % t.validate_every == 0:
          validations.append(_validate(grid, judged, trainer, step, workdir, writer))
  finally:  # also on errors: finish pending saves, stop workers
    ckpt.close()
    data.close()
  summary = checkpointing.run_summary(workdir, step, start_step, history, validations)
  if stopped:
    return checkpointing.stopped_summary(summary, stopped)
  if grid is not None and t.steps % t.validate_every:
    validations.append(_validate(grid, judged, trainer, step, workdir, writer))
  if t.export:
    summary["export"] = export(export_dir, step)
  writer.close()
  checkpointing.write_summary(workdir, summary)
  if history:
    h = history[-1]
    parts = ", ".join(f"{k} {h[k]:.4f}" for k in ("lm", "align", "diffusion") if k in h)
    print(f"trained {step} steps; last loss {h['loss']:.4f} ({parts})")
  return summary
