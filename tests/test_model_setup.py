"""The editor a config asks for: one pass from scratch or from a folder, and the training schedule
(a pretrained start keeps its folder's unless `model.scheduler` sets a field, which then applies)."""

import json
import os
import subprocess
import sys

import pytest

from configs import ip2p
from mre import model_setup
from mre.diffusion.schedule import schedule_from_config
from mre.models.config import UNetConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD15_LIKE = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "steps_offset": 1,
}  # no prediction_type: diffusers' default, epsilon


@pytest.fixture
def warnings(monkeypatch):
  said = []
  monkeypatch.setattr(model_setup.logging, "warning", lambda msg, *args: said.append(msg % args))
  return said


def _config(**scheduler):
  c = ip2p.get_config()
  c.model.scheduler.update(scheduler)
  return c


def test_the_full_recipes_set_no_schedule_field():
  assert model_setup.scheduler_settings(ip2p.get_config()) == {}
  toy = ip2p.get_config("toy")
  assert model_setup.scheduler_settings(toy)["prediction_type"] == "sample"


def test_an_unset_config_keeps_the_folders_schedule(warnings):
  assert model_setup.apply_scheduler_settings(_config(), SD15_LIKE, "/sd15") == SD15_LIKE
  same = _config(beta_schedule="scaled_linear", beta_start=0.00085, prediction_type="epsilon")
  assert model_setup.apply_scheduler_settings(same, SD15_LIKE, "/sd15") == SD15_LIKE
  assert not warnings  # values equal to the folder's (epsilon by default) change nothing


def test_a_set_field_replaces_the_folders_value_with_a_warning(warnings):
  c = _config(prediction_type="v_prediction", beta_end=0.02)
  got = model_setup.apply_scheduler_settings(c, SD15_LIKE, "/sd15")
  assert got == {**SD15_LIKE, "prediction_type": "v_prediction", "beta_end": 0.02}
  schedule = schedule_from_config(got)
  assert (schedule.prediction_type, schedule.beta_end) == ("v_prediction", 0.02)
  assert sorted(warnings) == [
      "model.scheduler.beta_end=0.02 replaces 0.012, the value of the scheduler config in /sd15",
      "model.scheduler.prediction_type='v_prediction' replaces 'epsilon', the value of the "
      "scheduler config in /sd15",
  ]


def test_what_cannot_apply_is_refused_by_name(warnings):
  with pytest.raises(ValueError, match="prediction_type: unsupported value 'flow'"):
    model_setup.apply_scheduler_settings(_config(prediction_type="flow"), SD15_LIKE, "/sd15")
  with pytest.raises(ValueError, match="prediction_type: unsupported value 'flow'"):
    model_setup.scheduler_config(_config(prediction_type="flow"))
  with pytest.raises(ValueError, match="beta_schedule: unsupported value 'cubic'"):
    model_setup.apply_scheduler_settings(_config(beta_schedule="cubic"), SD15_LIKE, "/sd15")
  listed = {**SD15_LIKE, "trained_betas": [0.01] * 1000}
  with pytest.raises(ValueError, match=r"beta_start=0.001 cannot apply: .*\(trained_betas\)"):
    model_setup.apply_scheduler_settings(_config(beta_start=0.001), listed, "/listed")
  assert not warnings  # nothing announced as applied when it was refused


def test_from_scratch_unset_fields_take_sd_values():
  assert model_setup.scheduler_config(_config()) == model_setup.SCRATCH_SCHEDULER
  toy = model_setup.scheduler_config(ip2p.get_config("toy"))
  assert (toy["beta_schedule"], toy["prediction_type"]) == ("squaredcos_cap_v2", "sample")


def test_the_command_line_sets_a_field_and_a_wrong_value_fails_at_once(tmp_path):
  workdir = tmp_path / "run"
  # The full recipe leaves the field unset (a placeholder): the command line sets it all the same.
  r = subprocess.run(
      [
          sys.executable,
          "-m",
          "mre.train",
          "--config=configs/ip2p.py",
          "--config.model.pretrained=",
          f"--config.workdir={workdir}",
          "--config.model.scheduler.prediction_type=x0",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert r.returncode != 0 and "prediction_type: unsupported value 'x0'" in r.stderr
  assert not workdir.exists()  # nothing was started


def test_a_pretrained_start_trains_and_exports_with_the_set_field(tiny_pipeline_dir, warnings):
  c = _config(prediction_type="v_prediction")
  c.model.pretrained, c.model.dtype, c.model.remat = tiny_pipeline_dir, "float32", ()
  models = model_setup.build_models(c)
  assert models.makers == {}  # nothing left to build: the weights came from the folder
  with open(os.path.join(tiny_pipeline_dir, "scheduler", "scheduler_config.json")) as f:
    folder = json.load(f)
  assert models.pipe.scheduler_config == {**folder, "prediction_type": "v_prediction"}
  assert len(warnings) == 1 and tiny_pipeline_dir in warnings[0]


def test_a_scratch_start_is_built_once_with_its_makers(tmp_path):
  c = ip2p.get_config("toy")
  models = model_setup.build_models(
      c, vocab_words=["turn", "red", "blue"], tokenizer_dir=str(tmp_path / "tok")
  )
  assert set(models.makers) == {"unet", "text_encoder"}
  unet = models.makers["unet"]()  # what the trainer calls under jit, sharded
  shapes = {k: v.shape for k, v in _flat(models.pipe.unet)}
  assert shapes == {k: v.shape for k, v in _flat(unet)}
  assert models.pipe.scheduler_config["prediction_type"] == "sample"


def _flat(module):
  from flax import nnx

  return nnx.to_flat_state(nnx.state(module, nnx.Param))


def test_source_skip_preconditioning_needs_the_source_skip():
  c = ip2p.get_config("toy")
  c.model.scratch.source_skip_sigma_data = 0.5
  assert model_setup.scratch_unet_config(c, 3, 64)["mre_source_skip_sigma_data"] == 0.5
  c.model.scratch.source_skip = False
  with pytest.raises(ValueError, match="source_skip=True"):
    model_setup.scratch_unet_config(c, 3, 64)


def test_affine_source_skip_widens_the_output_and_needs_the_source_skip():
  c = ip2p.get_config("toy")
  c.model.scratch.source_skip_affine = True
  cfg = model_setup.scratch_unet_config(c, 3, 64)
  assert cfg["out_channels"] == 12 and cfg["mre_source_skip_affine"] is True
  assert UNetConfig.from_dict(cfg).source_skip_affine
  c.model.scratch.source_skip = False
  with pytest.raises(ValueError, match="source_skip=True"):
    model_setup.scratch_unet_config(c, 3, 64)


def test_noisy_skip_reaches_the_unet_config():
  c = ip2p.get_config("toy")
  assert "mre_noisy_skip" not in model_setup.scratch_unet_config(c, 3, 64)
  c.model.scratch.noisy_skip = True
  assert UNetConfig.from_dict(model_setup.scratch_unet_config(c, 3, 64)).noisy_skip


def test_pixel_head_reaches_the_unet_config():
  c = ip2p.get_config("toy")
  unet = UNetConfig.from_dict(model_setup.scratch_unet_config(c, 3, 64))
  # The toy recipe's output is the scaled, gated head with Fourier features.
  assert unet.pixel_head == 128 and unet.pixel_head_only and unet.pixel_head_input_scale == 8.0
  assert unet.pixel_head_fourier == 4 and unet.pixel_head_gate
  c.model.scratch.pixel_head_fourier = 0
  c.model.scratch.pixel_head_gate = False
  cfg = model_setup.scratch_unet_config(c, 3, 64)
  assert "mre_pixel_head_fourier" not in cfg and "mre_pixel_head_gate" not in cfg
  c.model.scratch.pixel_head_input_scale = 1.0
  c.model.scratch.pixel_head_only = False
  c.model.scratch.pixel_head = 32
  cfg = model_setup.scratch_unet_config(c, 3, 64)
  assert "mre_pixel_head_only" not in cfg and "mre_pixel_head_input_scale" not in cfg
  assert UNetConfig.from_dict(cfg).pixel_head == 32
  c.model.scratch.pixel_head = 0
  assert "mre_pixel_head" not in model_setup.scratch_unet_config(c, 3, 64)


def test_self_condition_reaches_the_unet_config():
  c = ip2p.get_config("toy")
  assert "mre_self_condition" not in model_setup.scratch_unet_config(c, 3, 64)
  c.model.scratch.self_condition = True
  assert UNetConfig.from_dict(model_setup.scratch_unet_config(c, 3, 64)).self_condition
