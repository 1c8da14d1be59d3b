"""The reward-reliance measurement: zero for a model that cannot read its reward, not otherwise."""

import dataclasses

import pytest

from configs import reward
from mre.experiments.reward_reliance import reward_reliance
from mre.model_io import diffusers_folder
from mre.model_io.folders import load_any
from mre.models.reward_config import RewardConfig
from mre.models.reward_unet import reward_unet_from_stage1


def _export(tiny_pipeline_dir, folder, form):
  pipe = diffusers_folder.load_pipeline(tiny_pipeline_dir)
  pipe.unet = reward_unet_from_stage1(pipe.unet, RewardConfig(form=form), seed=0)
  pipe.unet.eval()
  diffusers_folder.save_pipeline(pipe, str(folder))
  return str(folder)


def _config(toy_data):
  c = reward.get_config("toy")
  c.data.data_dir, c.data.config, c.data.resolution, c.data.in_memory = toy_data, "tiny", 16, False
  return c


def test_reliance_is_zero_without_a_reward_path_and_not_with_one(
    tmp_path, tiny_pipeline_dir, toy_data
):
  bands = ((0, 500), (500, 1000))
  # The paper form starts as the stage-1 model (zero-initialised outputs): rewards change nothing.
  fresh = reward_reliance(
      _export(tiny_pipeline_dir, tmp_path / "paper", "paper"),
      _config(toy_data),
      batches=1,
      batch_size=8,
      bands=bands,
  )
  assert set(fresh) == {"t 0-500", "t 500-1000"}
  for r in fresh.values():
    assert r["true"] == pytest.approx(r["shuffled"], rel=1e-6) and r["true"] > 0
  # The released form's reward modules are random from the start: shuffling the rewards matters.
  random = reward_reliance(
      _export(tiny_pipeline_dir, tmp_path / "released", "released"),
      _config(toy_data),
      batches=1,
      batch_size=8,
      bands=bands,
  )
  assert all(abs(r["gain"]) > 1e-4 for r in random.values())
  # A model without reward is refused by name.
  with pytest.raises(ValueError, match="without reward"):
    reward_reliance(tiny_pipeline_dir, _config(toy_data), batches=1, batch_size=8)


def test_reliance_applies_the_source_skip_of_the_unet(tmp_path, tiny_pipeline_dir, toy_data):
  """The loss goes through the denoiser, as the trainer's does: the same weights with the source
  skip in their config give other losses (an editor of the toy recipes, whose U-Net alone gives
  the edit residual, was compared with the wrong target before)."""
  pipe = load_any(_export(tiny_pipeline_dir, tmp_path / "paper", "paper"))
  kwargs = dict(batches=1, batch_size=8, bands=((0, 1000),))
  plain = reward_reliance(pipe, _config(toy_data), **kwargs)["t 0-1000"]
  pipe.unet.config = dataclasses.replace(pipe.unet.config, source_skip=True)
  skip = reward_reliance(pipe, _config(toy_data), **kwargs)["t 0-1000"]
  assert skip["true"] > 0 and abs(skip["true"] - plain["true"]) > 1e-3 * plain["true"]
