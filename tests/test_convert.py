"""`python -m mre.convert` both ways: diffusers -> mre -> diffusers keeps every tensor exactly."""

import os
import subprocess
import sys

import numpy as np

from mre.model_io import native_format, safetensors_io


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  out = subprocess.run(
      [sys.executable, "-m", "mre.convert", *args],
      cwd=ROOT,
      text=True,
      capture_output=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  return out


def test_convert_round_trip(tmp_path, tiny_pipeline_dir):
  mre_dir, back_dir = str(tmp_path / "mre"), str(tmp_path / "back")
  r = _run(f"--from={tiny_pipeline_dir}", f"--to={mre_dir}")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "wrote mre checkpoint" in r.stdout and native_format.is_native(mre_dir)
  r = _run(f"--from={mre_dir}", f"--to={back_dir}")
  assert r.returncode == 0, r.stderr[-2000:]
  for sub, fname in [
      ("unet", "diffusion_pytorch_model.safetensors"),
      ("vae", "diffusion_pytorch_model.safetensors"),
  ]:
    a = safetensors_io.read_state_dict(os.path.join(tiny_pipeline_dir, sub))
    b = safetensors_io.read_safetensors(os.path.join(back_dir, sub, fname))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  a = safetensors_io.read_state_dict(os.path.join(tiny_pipeline_dir, "text_encoder"))
  b = safetensors_io.read_state_dict(os.path.join(back_dir, "text_encoder"))
  assert all(
      np.array_equal(v, b["text_model." + k if not k.startswith("text_model.") else k])
      for k, v in a.items()
      if "position_ids" not in k
  )
  from diffusers import StableDiffusionInstructPix2PixPipeline

  StableDiffusionInstructPix2PixPipeline.from_pretrained(back_dir)  # opens in PyTorch


def test_convert_refuses_bad_input(tmp_path):
  r = _run(f"--from={tmp_path / 'nowhere'}", f"--to={tmp_path / 'out'}")
  assert r.returncode != 0 and "does not exist" in r.stderr
  (tmp_path / "empty").mkdir()
  r = _run(f"--from={tmp_path / 'empty'}", f"--to={tmp_path / 'out'}")
  assert r.returncode != 0 and "neither an mre checkpoint" in r.stderr
