"""Train an editor: `python -m mre.train --config=configs/reward.py[:toy] [--config.key=value ...]`.

`train(config)` is the whole run: mesh, models (sharded), input pipeline, a compiled and donated
train step, Orbax checkpoints with automatic resume, metrics, validation grids, final export. A
`model.family='smartedit'` config is trained by `mre.smartedit_train.train`.
"""

from __future__ import annotations

import logging as std_logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, logging
from flax import nnx
from ml_collections import config_flags
from tqdm import tqdm

from mre import checkpointing, model_setup, sharding, smartedit_setup, smartedit_train
from mre.data import latent_cache, train_input
from mre.diffusion.schedule import schedule_from_config
from mre.model_io import diffusers_folder, native_format
from mre.models.vae import AutoencoderKL
from mre.pipeline import tokenize
from mre.train_step import (
    NonFiniteError,
    SplitModel,
    StepContext,
    StepTimer,
    init_train_state,
    log_metrics,
    lr_schedule,
    make_optimizer,
    make_train_step,
)
from mre.validation import validate, validation_grid, validation_judge

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training recipe, e.g. " "configs/reward.py:toy.", lock_config=True
)


SMARTEDIT = "smartedit"  # the family `mre.smartedit_train` trains


def materialize(module, mesh, min_size, make=None):
  """(SplitModel, params sharded over the mesh). With `make`, parameters are created by a jitted
  initialiser whose out_shardings come from eval_shape, so they never exist unsharded."""
  if make is not None:
    abstract = SplitModel.of(nnx.eval_shape(make))
    shardings = sharding.tree_shardings(mesh, abstract.params, min_size)
    rest_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract.rest)
    params, rest = jax.jit(
        lambda: nnx.split(make(), nnx.Param, ...)[1:], out_shardings=(shardings, rest_shardings)
    )()
    return SplitModel(abstract.graphdef, params, rest), params
  split = SplitModel.of(module)
  shardings = sharding.tree_shardings(mesh, split.params, min_size)
  params = jax.device_put(split.params, shardings)
  rest = jax.device_put(split.rest, sharding.replicated(mesh))
  return SplitModel(split.graphdef, params, rest), params


def cost_flops(compiled) -> float:
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0
  except Exception:  # pylint: disable=broad-except
    return 0.0  # not every backend reports a cost


def export_model(pipe, ema: dict, workdir: str):
  """The final EMA model: an mre checkpoint (what `mre.edit`/`mre.eval` load) and diffusers files."""
  nnx.update(pipe.unet, ema["unet"])
  if "text_encoder" in ema:
    nnx.update(pipe.text_encoder, ema["text_encoder"])
  out = os.path.join(workdir, "export")
  native_format.save_native(pipe, out)
  diffusers_dir = os.path.join(workdir, "export_diffusers")
  if isinstance(pipe.vae, AutoencoderKL):
    diffusers_folder.save_pipeline(pipe, diffusers_dir)
  elif ours := diffusers_folder.mre_only_options(pipe.unet.config):
    logging.info("no diffusers export: diffusers' U-Net has no %s", ", ".join(ours))
  else:  # pixel space has no diffusers VAE: the U-Net alone exports
    diffusers_folder.save_unet(pipe.unet, os.path.join(diffusers_dir, "unet"))
  return out


def ensure_stage1(config):
  """Trains the stage-1 editor first when the recipe names one (`config.stage1`, the toy reward
  recipe does) and its export, `config.model.pretrained`, is not on disk yet."""
  stage1 = config.get("stage1")
  if stage1 is None or not config.model.pretrained or os.path.isdir(config.model.pretrained):
    return
  export = os.path.join(stage1.workdir, "export")
  if os.path.abspath(export) != os.path.abspath(config.model.pretrained):
    raise ValueError(
        f"config.model.pretrained={config.model.pretrained!r} does not exist and is "
        f"not the export of config.stage1 ({export}): set one to the other"
    )
  msg = (
      f"stage 1 first: no stage-1 editor at {config.model.pretrained}, so training it "
      f"({stage1.train.steps} steps in {stage1.workdir}); stage 2 then starts from it"
  )
  logging.info(msg)
  print(msg)
  summary = train(stage1)
  if summary.get("stopped"):
    raise SystemExit(f"stage 1 stopped ({summary['stopped']}); rerun the command to resume it")


def train(config) -> dict:
  """Runs (or resumes) the training run described by `config`; returns a summary dict."""
  if config.model.family == SMARTEDIT:
    return smartedit_train.train(config)
  ensure_stage1(config)
  model_setup.check_pretrained(config)
  model_setup.scheduler_settings(config)  # a model.scheduler field it cannot use fails at once
  sharding.maybe_initialize_distributed(config.distributed)
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.get("tensor", 1))
  lead = jax.process_index() == 0
  t = config.train
  logging.info(
      "mesh %s over %d devices (%d processes)",
      dict(mesh.shape),
      jax.device_count(),
      jax.process_count(),
  )

  # --- data and models ---
  source = train_input.open_dataset(config)
  models = model_setup.build_models(
      config, vocab_words=source.vocabulary, tokenizer_dir=os.path.join(workdir, "tokenizer")
  )
  pipe, makers = models.pipe, models.makers
  reward_cfg = model_setup.reward_config(config)
  min_size = config.mesh.fsdp_min_size
  unet, unet_params = materialize(pipe.unet, mesh, min_size, makers.get("unet"))
  text, text_params = materialize(pipe.text_encoder, mesh, min_size, makers.get("text_encoder"))
  vae, vae_params = materialize(pipe.vae, mesh, min_size)
  trainable = {"unet": unet_params}
  frozen = {"vae": vae_params}
  if config.model.train_text_encoder:
    trainable["text_encoder"] = text_params
  else:
    frozen["text_encoder"] = text_params
  pipe.unet, pipe.text_encoder = unet.merge(), text.merge()

  schedule = schedule_from_config(pipe.scheduler_config)
  empty_ids = jnp.asarray(tokenize(pipe.tokenizer, [""]))
  ctx = StepContext(
      unet=unet,
      text_encoder=text,
      vae=vae,
      frozen=frozen,
      schedule=schedule,
      empty_ids=empty_ids,
      reward=reward_cfg,
      cfg=config,
  )
  tx = make_optimizer(config)

  init_state = lambda params: init_train_state(params, tx, config.seed)  # noqa: E731
  abstract = jax.eval_shape(init_state, trainable)
  state_shardings = sharding.tree_shardings(mesh, abstract, min_size)
  state = jax.jit(init_state, out_shardings=state_shardings)(trainable)

  per_host = t.batch_per_device * jax.local_device_count()
  latents = None
  if config.data.precompute_latents:
    latents = latent_cache.ensure(
        vae.merge(), source.train, os.path.join(workdir, "latent_cache"), config.data.resolution
    )
  data = train_input.TrainIterator(
      source,
      config,
      pipe.tokenizer,
      batch_size=per_host,
      accum=t.grad_accum,
      reward=reward_cfg,
      latents=latents,
  )
  ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints, async_save=t.async_checkpoints
  )
  start_step = 0
  if ckpt.latest_step() is not None:
    state, data_state = ckpt.restore(checkpointing.abstract_like(state))
    data.set_state(data_state)
    start_step = int(jax.device_get(state.step))
    logging.info("resumed from %s at step %d", ckpt.directory, start_step)
    print(f"resuming from step {start_step} ({ckpt.directory})")

  export_dir = os.path.join(workdir, "export")
  if start_step >= t.steps and (not t.export or native_format.is_native(export_dir)):
    ckpt.close()
    data.close()
    print(f"nothing to do: {workdir} is already at step {start_step} of {t.steps}")
    return {
        "workdir": workdir,
        "step": start_step,
        "resumed_from": start_step,
        "history": [],
        "validation": [],
        **({"export": export_dir} if t.export else {}),
    }

  # --- the compiled step ---
  example = sharding.global_batch(mesh, data.peek(), leading_unsharded=1)
  batch_shardings = jax.tree.map(lambda x: x.sharding, example)
  metric_shardings = sharding.replicated(mesh)
  step_fn = jax.jit(
      make_train_step(ctx, tx),
      in_shardings=(state_shardings, batch_shardings, metric_shardings),
      out_shardings=(state_shardings, metric_shardings),
      donate_argnums=(0,),
  )
  # The learning rate of every step, computed here and passed in: the compiled step holds no
  # schedule constants, so runs that differ only in steps or warm-up share it (train_step.py).
  rates = np.asarray(
      jax.jit(jax.vmap(lr_schedule(config)))(jnp.arange(max(t.steps, 1))), np.float32
  )
  rate_at = lambda i: jax.make_array_from_callback(  # noqa: E731
      (), metric_shardings, lambda _: rates[min(i, t.steps - 1)]
  )
  compile_start = time.time()
  compiled = step_fn.lower(state, example, rate_at(start_step)).compile()
  flops = cost_flops(compiled)
  logging.info(
      "train step compiled in %.1f s (%.3g FLOP per step)", time.time() - compile_start, flops
  )

  writer = None
  if lead:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

    writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
  grid = validation_grid(config, pipe, source) if (t.validate_every and lead) else None
  judged = validation_judge(config, pipe, source) if (t.validate_every and lead) else None
  global_batch_size = per_host * jax.process_count() * t.grad_accum

  history, validations, pending, step = [], [], None, start_step
  timer = StepTimer(start_step)

  def record(step_no, metrics):
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not m.pop("finite"):
      raise NonFiniteError(
          f"step {step_no}: loss={m['loss']} grad_norm={m['grad_norm']} is not finite; the update "
          f"was skipped and training stopped. Checkpoints in {ckpt.directory} hold the last good "
          "state. Lower train.lr, check the data, or use model.dtype=float32."
      )
    if step_no % t.log_every == 0 or step_no == t.steps:
      dt = timer.per_step(step_no)
      m.update(
          step_time=dt,
          images_per_s=global_batch_size / dt,
          tflops=flops / dt / 1e12 if flops else 0.0,
      )
      log_metrics(history, writer, step_no, m, ("loss", "grad_norm", "lr", "images_per_s"))
      bar.set_postfix(loss=f"{m['loss']:.4f}", img_s=f"{m['images_per_s']:.1f}")

  stopped = None
  try:
    with (
        checkpointing.StopSignal() as stop,
        tqdm(total=t.steps, initial=start_step, desc="train", unit="step", disable=not lead) as bar,
    ):
      while step < t.steps:
        batch = sharding.global_batch(mesh, data.next(), leading_unsharded=1)
        state, metrics = compiled(state, batch, rate_at(step))
        if pending is not None:  # read the previous step's metrics: the device stays busy
          record(*pending)
        step += 1
        pending = (step, metrics)
        bar.update(1)
        stopped = ckpt.stop_reason(stop, step)
        if step % t.checkpoint_every == 0 or step == t.steps or stopped:
          record(*pending)
          pending = None
          ckpt.save(step, state, data.get_state(), force=True)
        if stopped:
          break
        if grid is not None and step % t.validate_every == 0:
          validations.append(
              validate(grid, judged, jax.device_get(state.ema), step, workdir, writer)
          )
      if pending is not None:
        record(*pending)
  finally:  # also on errors (e.g. NonFiniteError): finish pending saves, stop workers
    ckpt.close()
    data.close()
  summary = checkpointing.run_summary(workdir, step, start_step, history, validations)
  if stopped:
    return checkpointing.stopped_summary(summary, stopped)
  if grid is not None and t.steps % t.validate_every:
    validations.append(validate(grid, judged, jax.device_get(state.ema), step, workdir, writer))
  if t.export and lead:
    summary["export"] = export_model(pipe, jax.device_get(state.ema), workdir)
  if writer:
    writer.close()
  if jax.process_index() == 0:  # one writer (`write_summary`)
    checkpointing.write_summary(workdir, summary)
  print(
      f"trained {step} steps; last loss {history[-1]['loss']:.4f}"
      if history
      else f"nothing to do: already at step {step}"
  )
  return summary


class _QuietLibraries(std_logging.Filter):
  """Keeps the console readable: library INFO chatter (Orbax logs every save step) is dropped."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "site-packages" not in record.pathname


def quiet_library_logs():
  """Installs `_QuietLibraries` on absl's handler (call from an entry point's main)."""
  logging.get_absl_handler().addFilter(_QuietLibraries())


def enable_compilation_cache(default: str = os.path.join("~", ".cache", "mre", "jax")) -> str:
  """Turns on JAX's persistent compilation cache (call from an entry point's main): a resumed or
  repeated run loads its compiled train step and samplers instead of compiling them again. The
  folder is JAX_COMPILATION_CACHE_DIR when set, else `default`."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(default))
  return jax.config.jax_compilation_cache_dir


def main(argv):
  quiet_library_logs()
  enable_compilation_cache()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/reward.py:toy")
  family = _CONFIG.value.model.family
  if family not in model_setup.FAMILIES + (SMARTEDIT,):  # a message, not a stack trace
    raise app.UsageError(
        f"model.family={family!r} is unknown (trainable: "
        f"{', '.join(model_setup.FAMILIES + (SMARTEDIT,))})"
    )
  if family == SMARTEDIT:
    why = smartedit_setup.refusal(_CONFIG.value)
    if why:
      raise app.UsageError(why)
  train(_CONFIG.value)


if __name__ == "__main__":
  app.run(main)
