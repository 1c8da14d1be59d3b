"""The README's first command: the toy reward recipe trains its stage-1 editor first when missing."""

import os

import pytest

from mre import train
from mre.experiments.recipes import set_field
from mre.model_io.folders import load_any
from mre.models.reward_unet import RewardUNet
from tests.test_train import TINY, tiny_config


def _two_stage(tmp_path, toy_data):
  # The paper form, as the toy recipe (the released form has no room for the toy U-Net's pooled
  # instruction embedding: refused, below).
  c = tiny_config(
      str(tmp_path / "reward"), toy_data, **{"train.steps": 2, "model.reward.form": "paper"}
  )
  c.model.pretrained = str(tmp_path / "ip2p" / "export")
  for key, value in {
      **TINY,
      "model.pretrained": "",
      "workdir": str(tmp_path / "ip2p"),
      "data.data_dir": toy_data,
      "train.steps": 2,
  }.items():
    set_field(c.stage1, key, value)
  return c


def test_a_missing_stage1_editor_is_trained_first(tmp_path, toy_data):
  c = _two_stage(tmp_path, toy_data)
  summary = train.train(c)
  assert summary["step"] == 2 and summary["resumed_from"] == 0
  stage1 = load_any(c.model.pretrained)  # written by stage 1, then stage 2's start
  assert not isinstance(stage1.unet, RewardUNet)
  assert isinstance(load_any(summary["export"]).unet, RewardUNet)
  # Run again: both stages are done, nothing is trained or exported anew.
  stamp = os.path.getmtime(os.path.join(c.model.pretrained, "mre_model.json"))
  again = train.train(c)
  assert again["history"] == [] and again["step"] == 2
  assert os.path.getmtime(os.path.join(c.model.pretrained, "mre_model.json")) == stamp

  # The released form cannot keep stage 1's text-time embedding (its add_embedding is the scores').
  c.model.reward.form, c.workdir = "released", str(tmp_path / "released")
  with pytest.raises(ValueError, match="released reward form cannot start from a U-Net with"):
    train.train(c)


def test_a_missing_start_that_is_not_stage1s_export_is_refused(tmp_path, toy_data):
  c = _two_stage(tmp_path, toy_data)
  c.model.pretrained = str(tmp_path / "elsewhere")
  with pytest.raises(ValueError, match="is not the export of config.stage1"):
    train.train(c)
