"""`python -m mre.bench` on the smallest shapes: every row of the SD 1.5 presets' code path (latent
space, VAE, bfloat16, diffusers' InstructPix2Pix pipeline) and of the toy preset's (pixel space, the
trainer's own from-scratch editor with its text encoder trained), JAX and PyTorch, and the table.

Functional only: no timing is asserted. One or two repetitions, networks of a few thousand weights.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ip2p
from mre.bench import presets, report, suite, torch_side

TINY_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 8,
    "out_channels": 4,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 16,
    "attention_head_dim": 2,
    "norm_num_groups": 4,
}
TINY_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [8, 8],
    "layers_per_block": 1,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "norm_num_groups": 4,
}
TINY_TEXT = {
    "vocab_size": 100,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}
# One torch thread: two would spin against each other and the JAX threads on a 2-core machine.
SETTINGS = suite.Settings(reps=1, warmup=1, edit_reps=1, measure_matmul=False, torch_threads=1)


def _tiny_sd15(tmp_path, rows):
  p = presets.sd15(
      "tiny-sd15", resolution=16, batch=2, edit_batch=2, edit_steps=2, rows=rows, remat=("resnet",)
  )
  p = dataclasses.replace(p, unet=TINY_UNET, vae=TINY_VAE, text=TINY_TEXT, tokens=8)
  return presets.with_tokenizer(p, str(tmp_path / "tok"))


def _tiny_toy(tmp_path, rows):
  c = ip2p.get_config("toy")
  c.data.resolution = 8
  c.model.scratch.unet_channels = (8, 16)
  c.model.scratch.text_hidden = 16
  c.model.scratch.text_layers = 1
  c.model.scratch.max_tokens = 8
  c.train.batch_per_device = 2
  c.data.data_dir = str(tmp_path / "no_data")  # the input row says the dataset is not there
  p = presets.from_config(c, str(tmp_path / "toy_tok"), name="tiny-toy", rows=rows, edit_steps=2)
  return presets.with_tokenizer(p, str(tmp_path / "unused"))


def _check(result, rows, torch_rows):
  assert [r["row"] for r in result["rows"]] == list(rows)
  assert result["peak_tflops"] and result["peak_tflops"] > 0
  for r in result["rows"]:
    j = r["jax"]
    assert j["ms"] > 0 and j["items_per_s"] > 0 and j["reps"] == 1
    assert j["compile_s"] >= 0
    if r["row"] in torch_rows:
      t = r["torch"]
      assert t["ms"] > 0 and t["items_per_s"] > 0, r
      assert r["ratio"] == pytest.approx(j["ms"] / t["ms"])
    if r["row"] not in ("edit", "edit_batch"):  # XLA's cost analysis of one computation
      assert j["flops"] > 0 and j["tflops"] > 0 and 0 < j["mfu"], r
      assert j["memory_gb"] > 0
      if r["row"] in torch_rows:
        assert r["torch"]["tflops"] > 0
    else:
      assert j["steps"] == 2 and j["step_ms"] == pytest.approx(j["ms"] / 2)
  table = report.text_table(result)
  for column in ("JAX ms", "PyTorch ms", "JAX TFLOP/s", "MFU", "JAX/PyTorch"):
    assert column in table
  return table


def test_sd15_code_path_on_tiny_shapes(tmp_path):
  pytest.importorskip("diffusers")
  # edit_batch is the edit row's code at another batch: left out to save a compilation
  rows = presets.TRAIN_ROWS + ("unet_forward", "edit") + presets.CONV_ROWS
  result = suite.run(_tiny_sd15(tmp_path, rows), SETTINGS, log=lambda _: None)
  assert result["torch_info"]["device"] == "cpu"
  _check(result, rows, torch_rows=rows)
  edit = next(r for r in result["rows"] if r["row"] == "edit")
  assert edit["batch"] == 1 and edit["torch"]["how"] == "StableDiffusionInstructPix2PixPipeline"
  json_path, md_path = report.write([result], str(tmp_path / "out"))
  with open(json_path) as f:
    assert json.load(f)[0]["rows"][0]["row"] == "unet_train"
  with open(md_path) as f:
    assert "| U-Net train step (fwd+bwd+AdamW) |" in f.read()


def test_toy_code_path_and_the_torch_column_when_off(tmp_path):
  pytest.importorskip("diffusers")
  rows = ("input_pipeline", "trainer", "edit")
  result = suite.run(_tiny_toy(tmp_path, rows), SETTINGS, log=lambda _: None)
  assert "not readable here" in result["rows"][0]["jax"]["skipped"]
  result["rows"] = result["rows"][1:]
  _check(result, rows[1:], torch_rows=rows[1:])
  assert result["rows"][1]["torch"]["how"].startswith("the pipeline's loop")
  off = suite.run(
      _tiny_toy(tmp_path, ("conv_forward",)), dataclasses.replace(SETTINGS, torch="off"), log=print
  )
  assert (
      off["rows"][0]["torch"] == {"skipped": "off (--torch=off)"} and "ratio" not in off["rows"][0]
  )
  assert "PyTorch: off (--torch=off)" in report.text_table(off)


def test_levers_are_timed_in_turns_with_pytorch(tmp_path):
  pytest.importorskip("diffusers")
  from mre.bench import levers

  p = _tiny_sd15(tmp_path, ())
  with torch_side.threads(1):
    rows = levers.run(p, ["flat_state", "flat_kernel_grad", "torch"], rounds=1, log=lambda _: None)
  assert [r["lever"] for r in rows] == ["flat_state", "flat_kernel_grad", "torch"]
  assert all(r["ms_per_32"] > 0 and r["vs_baseline"] is None for r in rows)
  assert "flat_state" in levers.table(rows)


def test_conv_kernel_gradient_variants_agree_with_xla():
  """The hand-made kernel gradients of `mre.bench.conv_grad` are XLA's, so its timings compare
  like with like."""
  from mre.bench import conv_grad

  ms, error = conv_grad.run(batch=2, size=5, cin=3, cout=4, rounds=1)
  assert set(ms) == set(error) == set(conv_grad.VARIANTS) and all(v > 0 for v in ms.values())
  assert max(error.values()) < 1e-4
  x = jax.random.normal(jax.random.key(1), (2, 5, 5, 3))
  g = jax.random.normal(jax.random.key(2), (2, 5, 5, 4))
  w = jax.random.normal(jax.random.key(3), (3, 3, 3, 4))
  _, pull = jax.vjp(conv_grad.xla_conv, x, w)
  dx, dw = pull(g)
  for kernel_grad in (
      conv_grad.im2col_kernel_grad,
      conv_grad.per_tap_kernel_grad,
      conv_grad.flat_shift_kernel_grad,
  ):
    np.testing.assert_allclose(kernel_grad(x, g), dw, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(conv_grad._input_grad(g, w), dx, rtol=1e-5, atol=1e-5)
  # flat_shift copies the side with fewer channels: here the output gradient (4 -> 3 channels),
  # on a non-square image and a batch of 3, whose shifts must not leak from image to image
  x = jax.random.normal(jax.random.key(4), (3, 4, 6, 4))
  g = jax.random.normal(jax.random.key(5), (3, 4, 6, 3))
  _, pull = jax.vjp(conv_grad.xla_conv, x, jnp.zeros((3, 3, 4, 3)))
  np.testing.assert_allclose(
      conv_grad.flat_shift_kernel_grad(x, g), pull(g)[1], rtol=1e-5, atol=1e-5
  )
