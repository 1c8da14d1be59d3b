"""The JAX rows: the U-Net's train step, the trainer's whole step, the guided U-Net call, edits.

Everything runs through the project's own code: networks from `mre.models` (or the trainer's
`model_setup` for a config preset), parameters created by `mre.train.materialize`, the step of
`mre.train_step.make_train_step`, editing with `mre.editor.Editor` (the compiled sampler loop of
`mre.diffusion`). One device; the step is compiled ahead of time (`.lower().compile()`), so
compilation is timed apart and XLA's cost analysis gives the FLOPs of a step.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from mre import sharding, train
from mre.data import train_input
from mre.bench import hardware
from mre.bench.inputs import Inputs
from mre.bench.presets import Preset
from mre.bench.timing import Runner
from mre.diffusion.guidance import dual_guidance
from mre.diffusion.schedule import schedule_from_config
from mre.editor import EditSettings, Editor
from mre.model_setup import dtype_of, reward_config
from mre.models.clip_text import CLIPTextModel
from mre.models.pixel import PixelSpace
from mre.models.unet import UNet2DConditionModel
from mre.models.vae import AutoencoderKL
from mre.pipeline import Pipeline
from mre.train_step import StepContext, init_train_state, make_optimizer, make_train_step

REPLICATED = 2**62  # fsdp_min_size: one device, nothing is split


def one_device_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), sharding.BATCH_AXES)


def makers(preset: Preset, *, param_dtype: str = "float32") -> dict:
  """Constructors of the preset's networks from its config dicts (random weights)."""
  kw = dict(dtype=dtype_of(preset.dtype), param_dtype=dtype_of(param_dtype))
  out = {
      "unet": lambda: UNet2DConditionModel(preset.unet, remat=preset.remat, rngs=nnx.Rngs(0), **kw),
      "text_encoder": lambda: CLIPTextModel(preset.text, rngs=nnx.Rngs(1), **kw),
  }
  if preset.vae is not None:
    out["vae"] = lambda: AutoencoderKL(preset.vae, rngs=nnx.Rngs(2), **kw)
  return out


def _carried(compiled, state, batch):
  """`call()` running `state, out = compiled(state, batch)`, the state carried (and donated) from
  call to call."""
  holder = [state]

  def call():
    holder[0], out = compiled(holder[0], batch)
    jax.block_until_ready(out)

  return call


def _info(compiled, compile_s: float, **extra) -> dict:
  return {
      "compile_s": compile_s,
      "flops": train.cost_flops(compiled),
      "memory_gb": hardware.compiled_memory_gb(compiled),
      **extra,
  }


def _device_memory() -> dict:
  return {"device_peak_memory_gb": hardware.device_peak_memory_gb()}


def _compile(fn, *args, compiler_options=None):
  start = time.perf_counter()
  compiled = fn.lower(*args).compile(compiler_options=compiler_options)
  return compiled, time.perf_counter() - start


def unet_train(
    preset: Preset,
    inputs: Inputs,
    *,
    compiler_options=None,
    donate=True,
    flat_state=False,
    conv_fn=None,
) -> Runner:
  """The U-Net alone: forward, MSE to a target, backward, the recipe's optimizer (clip + AdamW).

  The options are levers (`mre.bench.levers`): XLA compiler options for this computation, no
  buffer donation, the state passed as a flat list of arrays instead of NNX pytrees, and the
  function every convolution of the U-Net calls (`conv_fn`, in place of
  `jax.lax.conv_general_dilated`).
  """
  mesh = one_device_mesh()
  make = makers(preset)["unet"]
  if conv_fn is not None:

    def make(plain=make):  # pylint: disable=function-redefined
      unet = plain()
      for _, module in nnx.iter_modules(unet):
        if isinstance(module, nnx.Conv):
          module.conv_general_dilated = conv_fn
      return unet

  unet, params = train.materialize(None, mesh, REPLICATED, make)
  tx = make_optimizer(preset.config)
  state = (params, tx.init(params))
  batch = jax.device_put(inputs.unet_batch(preset.batch))

  def step(state, batch):
    params, opt_state = state

    def loss_fn(p):
      out = unet.merge(p)(batch["sample"], batch["timesteps"], batch["context"])
      return jnp.mean((out.astype(jnp.float32) - batch["target"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  if flat_state:  # no Variable objects to flatten and rebuild around each call
    treedef = jax.tree.structure(state)
    state = jax.tree.leaves(state)
    structured = step

    def step(leaves, batch):  # pylint: disable=function-redefined
      new, loss = structured(jax.tree.unflatten(treedef, leaves), batch)
      return jax.tree.leaves(new), loss

  fn = jax.jit(step, donate_argnums=(0,) if donate else ())
  compiled, compile_s = _compile(fn, state, batch, compiler_options=compiler_options)
  return Runner(
      _carried(compiled, state, batch), preset.batch, _info(compiled, compile_s), _device_memory
  )


def _trainer_networks(preset: Preset, mesh):
  """(unet, text, vae) SplitModels and their parameters, as `mre.train.train` creates them."""
  if preset.models is not None:  # a config preset: the trainer's own models (maybe pretrained)
    pipe, make = preset.models.pipe, preset.models.makers
    unet = train.materialize(pipe.unet, mesh, REPLICATED, make.get("unet"))
    text = train.materialize(pipe.text_encoder, mesh, REPLICATED, make.get("text_encoder"))
    vae = train.materialize(pipe.vae, mesh, REPLICATED)
    return unet, text, vae
  make = makers(preset)
  unet = train.materialize(None, mesh, REPLICATED, make["unet"])
  text = train.materialize(None, mesh, REPLICATED, make["text_encoder"])
  if preset.vae is None:
    vae = train.materialize(PixelSpace({"channels": 3}), mesh, REPLICATED)
  else:
    vae = train.materialize(None, mesh, REPLICATED, make["vae"])
  return unet, text, vae


def trainer(preset: Preset, inputs: Inputs) -> Runner:
  """The trainer's whole step (`mre.train_step`): VAE encoding, text encoding, conditioning
  dropout, noising, U-Net, loss, backward, clipping, AdamW, EMA, the NaN guard."""
  mesh = one_device_mesh()
  (unet, unet_p), (text, text_p), (vae, vae_p) = _trainer_networks(preset, mesh)
  trainable, frozen = {"unet": unet_p}, {"vae": vae_p}
  (trainable if preset.train_text_encoder else frozen)["text_encoder"] = text_p
  cfg = preset.config
  ctx = StepContext(
      unet=unet,
      text_encoder=text,
      vae=vae,
      frozen=frozen,
      schedule=schedule_from_config(preset.scheduler),
      empty_ids=jnp.asarray(inputs.empty_ids),
      reward=reward_config(cfg),
      cfg=cfg,
  )
  tx = make_optimizer(cfg)
  state = jax.jit(lambda p: init_train_state(p, tx, cfg.seed))(trainable)
  example = sharding.global_batch(
      mesh, inputs.trainer_batch(preset.batch, reward_config(cfg)), leading_unsharded=1
  )
  step = jax.jit(make_train_step(ctx, tx), donate_argnums=(0,))
  compiled, compile_s = _compile(step, state, example)
  info = _info(compiled, compile_s, reward=reward_config(cfg) is not None)
  return Runner(_carried(compiled, state, example), preset.batch, info, _device_memory)


def edit_pipeline(preset: Preset) -> Pipeline:
  """The editor's pieces with random weights, parameters in the computation dtype (inference),
  created by one compiled initialiser each (eager creation dispatches every parameter alone)."""
  mesh = one_device_mesh()
  make = makers(preset, param_dtype=preset.dtype)
  build = lambda f: train.materialize(None, mesh, REPLICATED, f)[0].merge()  # noqa: E731
  if preset.models is not None and preset.models.makers:  # the config's own (reward) U-Net
    unet = build(preset.models.makers["unet"])
  elif preset.models is not None:
    unet = preset.models.pipe.unet
  else:
    unet = build(make["unet"])
  return Pipeline(
      unet=unet,
      vae=build(make["vae"]) if preset.vae is not None else PixelSpace({"channels": 3}),
      text_encoder=build(make["text_encoder"]),
      tokenizer=preset.tokenizer,
      scheduler_config=preset.scheduler,
      model_index={},
  )


def unet_forward(pipe: Pipeline, inputs: Inputs) -> Runner:
  """One guided denoising step's network call: the three branches stacked, batch 3 x 1."""
  state = nnx.state(pipe.unet)
  graphdef = nnx.graphdef(pipe.unet)
  b = inputs.edit_unet_args(1)
  kwargs = {}
  if hasattr(pipe.unet, "reward_config"):
    kwargs["extra_cond"] = {"reward": inputs.reward_inputs(1)}

  def guided(state, latents, image, text, uncond, t):
    model = lambda *a, **k: nnx.merge(graphdef, state)(*a, **k)  # noqa: E731
    return dual_guidance(model, latents, image, text, uncond, t, **kwargs)

  args = (state, b["latents"], b["image"], b["text"], b["uncond"], b["t"])
  compiled, compile_s = _compile(jax.jit(guided), *args)
  call = lambda: compiled(*args).block_until_ready()  # noqa: E731
  return Runner(call, 1, _info(compiled, compile_s), _device_memory)


def edit(pipe: Pipeline, preset: Preset, inputs: Inputs, batch: int) -> Runner:
  """`Editor.edit_arrays`: text and image encoding, N Euler-ancestral steps with the three guidance
  branches in one compiled loop, decoding; `batch` images at once."""
  settings = EditSettings(
      steps=preset.edit_steps,
      sampler="euler_ancestral",
      text_scale=7.5,
      image_scale=1.5,
      resolution=preset.resolution,
  )
  editor = Editor(pipe, settings)
  images, instructions = inputs.edit_images(batch)
  return Runner(
      lambda: editor.edit_arrays(images, instructions),
      batch,
      {"steps": preset.edit_steps},
      _device_memory,
      compiles_on_first_call=True,
  )


CONV_PARTS = {"conv_forward": "forward", "conv_input_grad": "input", "conv_weight_grad": "weight"}


def conv(preset: Preset, inputs: Inputs, row: str) -> Runner:
  """One 3x3 convolution of the U-Net's first level (what `nnx.Conv` runs): its forward, or the
  gradient with respect to its input or to its kernel alone."""
  x, w, dy = (jnp.asarray(a) for a in inputs.conv_arrays(preset.batch))
  fwd = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  part = CONV_PARTS[row]
  if part == "forward":
    fn = fwd
  elif part == "input":
    fn = lambda x, w, dy: jax.vjp(lambda x: fwd(x, w), x)[1](dy)[0]  # noqa: E731
  else:
    fn = lambda x, w, dy: jax.vjp(lambda w: fwd(x, w), w)[1](dy)[0]  # noqa: E731
  args = (x, w) if part == "forward" else (x, w, dy)
  compiled, compile_s = _compile(jax.jit(fn), *args)
  call = lambda: compiled(*args).block_until_ready()  # noqa: E731
  return Runner(call, preset.batch, _info(compiled, compile_s))


def input_pipeline(preset: Preset) -> Runner | str:
  """The trainer's input: one batch from `TrainIterator` (the config's dataset, decoding, flips,
  tokenising, reward texts) placed on the device as `mre.train` places it; or why not."""
  if preset.models is None:
    return "a preset without a training config's dataset"
  cfg = preset.config.copy_and_resolve_references()
  cfg.data.build_if_missing = False
  try:
    source = train_input.open_dataset(cfg)
    data = train_input.TrainIterator(
        source, cfg, preset.tokenizer, batch_size=preset.batch, accum=1, reward=reward_config(cfg)
    )
    data.peek()
  except Exception as e:  # pylint: disable=broad-except  (not prepared, unreadable: skip the row)
    return f"dataset {cfg.data.name} not readable here ({type(e).__name__})"
  mesh = one_device_mesh()
  call = lambda: jax.block_until_ready(  # noqa: E731
      sharding.global_batch(mesh, data.next(), leading_unsharded=1)
  )
  return Runner(call, preset.batch, {}, lambda: (data.close(), {})[1])
