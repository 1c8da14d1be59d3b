"""Loading real diffusers folders, clear errors for bad ones, and export back to PyTorch."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from mre import pipeline
from mre.model_io import diffusers_folder, safetensors_io, torch_state_dict
from mre.models.config import ConfigError
from tests.reference import nchw, nhwc, torch


@pytest.fixture(scope="module")
def loaded(tiny_pipeline_dir):
  return diffusers_folder.load_pipeline(tiny_pipeline_dir)


def _inputs(seed=0, ctx_dim=32):
  rs = np.random.RandomState(seed)
  return (
      rs.randn(2, 8, 16, 16).astype(np.float32),
      np.array([1, 800]),
      rs.randn(2, 77, ctx_dim).astype(np.float32),
  )


def test_pipeline_folder_loads_and_matches(tiny_pipeline_dir, loaded):
  from diffusers import StableDiffusionInstructPix2PixPipeline

  ref = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_pipeline_dir)
  x, t, ctx = _inputs()
  with torch.no_grad():
    want = ref.unet(torch.tensor(x), torch.tensor(t), torch.tensor(ctx)).sample.numpy()
  np.testing.assert_allclose(nchw(loaded.unet(nhwc(x), t, ctx)), want, atol=1e-4, rtol=0)
  ids = pipeline.tokenize(loaded.tokenizer, ["turn the red circle blue", ""])
  assert ids.shape == (2, 77)
  ref_ids = ref.tokenizer(
      ["turn the red circle blue", ""],
      padding="max_length",
      max_length=77,
      truncation=True,
      return_tensors="np",
  ).input_ids
  np.testing.assert_array_equal(ids, ref_ids)
  with torch.no_grad():
    want_h = ref.text_encoder(torch.tensor(ids)).last_hidden_state.numpy()
  np.testing.assert_allclose(
      np.asarray(loaded.text_encoder(jnp.asarray(ids))[0]), want_h, atol=1e-4, rtol=0
  )
  assert loaded.scheduler_config["beta_schedule"] == "scaled_linear"


def test_export_round_trip_to_diffusers(tmp_path, loaded):
  from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

  diffusers_folder.save_unet(loaded.unet, str(tmp_path / "unet_only"))
  back = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet_only")).eval()
  x, t, ctx = _inputs(1)
  with torch.no_grad():
    want = back(torch.tensor(x), torch.tensor(t), torch.tensor(ctx)).sample.numpy()
  np.testing.assert_allclose(nchw(loaded.unet(nhwc(x), t, ctx)), want, atol=1e-4, rtol=0)

  diffusers_folder.save_pipeline(loaded, str(tmp_path / "pipe"))
  pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(tmp_path / "pipe"))
  assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
  img = np.random.RandomState(2).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    want_lat = pipe.vae.encode(torch.tensor(img)).latent_dist.mean.numpy()
  np.testing.assert_allclose(nchw(loaded.vae.encode(nhwc(img)).mode()), want_lat, atol=1e-4)
  # And our loader reads our own export back, bit for bit.
  again = diffusers_folder.load_pipeline(str(tmp_path / "pipe"))
  for a, b in [
      (loaded.unet, again.unet),
      (loaded.vae, again.vae),
      (loaded.text_encoder, again.text_encoder),
  ]:
    sa, sb = torch_state_dict.state_dict(a), torch_state_dict.state_dict(b)
    assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


def _copy_unet(src_pipe, dst):
  shutil.copytree(os.path.join(src_pipe, "unet"), dst)
  return dst, os.path.join(dst, "diffusion_pytorch_model.safetensors")


def test_missing_tensor_is_named(tmp_path, tiny_pipeline_dir):
  folder, path = _copy_unet(tiny_pipeline_dir, str(tmp_path / "unet"))
  sd = safetensors_io.read_safetensors(path)
  del sd["mid_block.attentions.0.proj_in.weight"]
  sd["extra.weight"] = np.zeros(3, np.float32)
  safetensors_io.write_safetensors(path, sd)
  with pytest.raises(safetensors_io.WeightsError) as e:
    diffusers_folder.load_unet(folder)
  assert "missing tensors: mid_block.attentions.0.proj_in.weight" in str(e.value)
  assert "unexpected tensors: extra.weight" in str(e.value)


def test_wrong_shape_is_named_with_both_shapes(tmp_path, tiny_pipeline_dir):
  folder, path = _copy_unet(tiny_pipeline_dir, str(tmp_path / "unet"))
  sd = safetensors_io.read_safetensors(path)
  sd["conv_in.weight"] = np.zeros((16, 4, 3, 3), np.float32)  # a 4-channel SD 1.5 conv_in
  safetensors_io.write_safetensors(path, sd)
  with pytest.raises(
      safetensors_io.WeightsError,
      match=r"conv_in.weight has shape \(16, 4, 3, 3\).*expects \(16, 8, 3, 3\)",
  ):
    diffusers_folder.load_unet(folder)


def test_missing_config_key_is_named(tmp_path, tiny_pipeline_dir):
  folder, _ = _copy_unet(tiny_pipeline_dir, str(tmp_path / "unet"))
  cfg_path = os.path.join(folder, "config.json")
  cfg = json.load(open(cfg_path))
  del cfg["block_out_channels"]
  json.dump(cfg, open(cfg_path, "w"))
  with pytest.raises(ConfigError, match="block_out_channels"):
    diffusers_folder.load_unet(folder)
  with pytest.raises(
      FileNotFoundError, match="not a diffusers pipeline folder: it has no scheduler/"
  ):
    diffusers_folder.load_pipeline(str(tmp_path))


def test_safetensors_bf16_and_bin_files(tmp_path, tiny_pipeline_dir):
  import ml_dtypes

  t = {
      "a": np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16),
      "b": np.ones((2,), np.float16),
  }
  safetensors_io.write_safetensors(str(tmp_path / "x.safetensors"), t)
  back = safetensors_io.read_safetensors(str(tmp_path / "x.safetensors"))
  assert back["a"].dtype == ml_dtypes.bfloat16 and np.array_equal(back["a"], t["a"])
  # The same U-Net stored as a pickled PyTorch .bin loads to the same weights.
  folder, path = _copy_unet(tiny_pipeline_dir, str(tmp_path / "unet"))
  sd = safetensors_io.read_safetensors(path)
  torch.save(
      {k: torch.tensor(v) for k, v in sd.items()},
      os.path.join(folder, "diffusion_pytorch_model.bin"),
  )
  os.remove(path)
  unet = diffusers_folder.load_unet(folder)
  np.testing.assert_array_equal(
      torch_state_dict.state_dict(unet)["conv_in.weight"], sd["conv_in.weight"]
  )
