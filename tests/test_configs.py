"""The recipes: variants, locked overrides, and failing fast without pretrained weights."""

import os
import subprocess
import sys

import pytest

from configs import common, ip2p, reward
from mre import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_recipes_hold_the_papers_numbers():
  c = reward.get_config()
  assert (c.data.resolution, c.train.batch_per_device, c.train.grad_accum) == (256, 4, 4)
  assert (c.train.lr, c.train.lr_schedule, c.train.warmup_steps) == (5e-5, "constant", 0)
  assert (c.train.weight_decay, c.train.clip, c.train.cond_dropout) == (1e-2, 1.0, 0.05)
  assert (c.train.steps, c.train.checkpoint_every, c.model.reward.dropout_prob) == (
      10_000,
      500,
      0.0,
  )
  assert c.model.remat and c.model.reward.enabled and not c.model.train_text_encoder
  s1 = ip2p.get_config()
  assert s1.train.lr == 1e-4 and not s1.model.reward.enabled and s1.train.ema_decay == 0.9999
  toy = reward.get_config("toy")
  assert toy.model.train_text_encoder and toy.stage1.stage == "ip2p"
  # Stage 2 of the toy world starts from the stage-1 toy editor's export.
  assert toy.model.pretrained == os.path.join(toy.stage1.workdir, "export")
  assert ip2p.get_config("toy").model.pretrained == ""
  with pytest.raises(ValueError, match="unknown config variant"):
    reward.get_config("tiny")
  assert set(common.VARIANTS) == {"full", "toy"}


def test_reward_recipe_without_weights_fails_at_once_naming_the_path(tmp_path):
  c = reward.get_config()
  c.model.pretrained = str(tmp_path / "no_such_ip2p")
  c.workdir = str(tmp_path / "run")
  with pytest.raises(FileNotFoundError) as e:
    train.train(c)
  assert "no_such_ip2p" in str(e.value) and "configs/reward.py:toy" in str(e.value)
  assert not os.path.exists(c.workdir)  # nothing was started


def test_cli_rejects_a_misspelt_key():
  r = subprocess.run(
      [
          sys.executable,
          "-m",
          "mre.train",
          "--config=configs/reward.py:toy",
          "--config.train.lrr=0.1",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert r.returncode != 0 and "lrr" in r.stderr
