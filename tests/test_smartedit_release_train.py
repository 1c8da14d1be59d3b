"""Training a release-size SmartEdit (`configs/smartedit.py`, mre/smartedit_release.py) on a tiny
editor folder in the release's layout: latent space through the folder's VAE, the multi-reward
U-Net added to the loaded one, two micro-batches per update, the export reopened by `mre.edit`'s
loader; and the same run on 8 fake CPU devices over a (data 2, fsdp 2, tensor 2) mesh, which must
end at the same parameters."""

import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import smartedit
from mre import smartedit_release, train
from mre.model_io import smartedit_folder as sf
from mre.models.reward_unet import RewardUNet
from tests.smartedit_fixtures import editor_config, rigged_model, write_editor_folder
from tests.test_smartedit_train import checkpoint, flat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2
SETTINGS = {
    "data.name": "toy_edit",
    "data.config": "tiny",
    "data.resolution": 16,
    "data.build_if_missing": True,
    "model.dtype": "float32",
    "model.reward.enabled": True,
    "model.reward.score_dim": 16,
    "model.reward.heads": 2,
    "model.smartedit.max_prompt_tokens": 512,  # the tests' LLaMA tokenizer has one id per letter
    "train.steps": STEPS,
    "train.batch_per_device": 4,
    "train.grad_accum": 2,
    "train.lr": 1e-3,
    "train.lr_schedule": "constant",
    "train.checkpoint_every": 1,
    "train.log_every": 1,
    "train.validate_every": 0,
    "mesh.data": 1,
    "mesh.fsdp": 1,
    "mesh.fsdp_min_size": 256,
}


def settings(workdir, folder, data_dir, **overrides):
  return {
      **SETTINGS,
      "workdir": str(workdir),
      "model.pretrained": folder,
      "data.data_dir": data_dir,
      **overrides,
  }


@pytest.fixture(scope="module")
def editor_folder(tmp_path_factory):
  """A tiny SmartEdit in the release's layout with its folders (4 latent channels, a VAE)."""
  return write_editor_folder(
      tmp_path_factory.mktemp("release"), rigged_model(config=editor_config())
  )


@pytest.fixture(scope="module")
def release_run(tmp_path_factory, editor_folder, toy_data):
  workdir = tmp_path_factory.mktemp("release_run")
  c = smartedit.get_config()
  c.update_from_flattened_dict(settings(workdir, editor_folder, toy_data))
  return str(workdir), train.train(c)


def test_a_release_size_smartedit_trains_from_its_folder_and_exports(release_run, editor_folder):
  workdir, summary = release_run
  history = summary["history"]
  assert len(history) == STEPS and all(np.isfinite(h["loss"]) for h in history)
  assert all(h["lm"] > 0 and h["diffusion"] > 0 for h in history)
  export = summary["export"]
  assert os.path.exists(os.path.join(export, sf.EDITOR_JSON))
  trained = flat(checkpoint(workdir, STEPS)["params"])
  before = sf.load_editor_folder(editor_folder).model
  after = sf.load_editor_folder(export).model  # the folders named in its smartedit.json
  assert isinstance(after.unet, RewardUNet)
  got = flat(nnx.to_pure_dict(nnx.state(after, nnx.Param)))
  old = flat(nnx.to_pure_dict(nnx.state(before, nnx.Param)))
  for key, value in trained.items():  # the export holds the last step's trained weights
    np.testing.assert_allclose(got[key], value, atol=1e-6, err_msg=str(key))
  q_proj = ("llm", "model", "layers", "0", "self_attn", "q_proj")
  np.testing.assert_array_equal(got[q_proj + ("kernel",)], old[q_proj + ("kernel",)])  # frozen
  assert not np.array_equal(got[q_proj + ("lora_B", "kernel")], old[q_proj + ("lora_B", "kernel")])
  assert not np.array_equal(got[("unet", "conv_in", "kernel")], old[("unet", "conv_in", "kernel")])
  img = after.config.tokens.img  # the base vocabulary's rows are kept
  emb = ("llm", "model", "embed_tokens", "embedding")
  np.testing.assert_array_equal(got[emb][:img], old[emb][:img])


def test_a_finished_release_run_resumes_to_nothing(release_run, editor_folder, toy_data):
  workdir, _ = release_run
  c = smartedit.get_config()
  c.update_from_flattened_dict(settings(workdir, editor_folder, toy_data))
  again = train.train(c)
  assert again["resumed_from"] == STEPS and again["history"] == []


def test_a_missing_folder_beside_the_smartedit_folder_is_named(tmp_path, editor_folder, toy_data):
  c = smartedit.get_config()
  c.update_from_flattened_dict(
      settings(tmp_path / "run", editor_folder, toy_data, **{"model.smartedit.ip2p": "/nowhere"})
  )
  with pytest.raises(FileNotFoundError, match="ip2p folder /nowhere does not exist"):
    smartedit_release.build_release(c)


def test_a_reward_folder_trains_further_only_with_its_own_reward_form(release_run, toy_data):
  export = release_run[1]["export"]  # its RewardUNet has score_dim 16
  c = smartedit.get_config()
  c.update_from_flattened_dict(settings("/unused", export, toy_data))
  editor = smartedit_release.build_release(c)
  assert isinstance(editor.pipe.model.unet, RewardUNet)
  c.model.reward.score_dim = 32
  with pytest.raises(ValueError, match="score_dim 16 there, 32 here"):
    smartedit_release.build_release(c)
  c.model.reward.enabled = False
  with pytest.raises(ValueError, match="set model.reward.enabled=True"):
    smartedit_release.build_release(c)


def test_the_sharded_run_matches_the_single_device_run(
    tmp_path, release_run, editor_folder, toy_data
):
  """8 fake CPU devices, mesh (data 2, fsdp 2, tensor 2), one example per batch device: the same
  global batch of 4 x 2 micro-batches, the same parameters after the two steps."""
  workdir = str(tmp_path / "sharded")
  overrides = settings(
      workdir,
      editor_folder,
      toy_data,
      **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "train.batch_per_device": 1},
  )
  args = [sys.executable, "-m", "mre.train", "--config=configs/smartedit.py"]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  env = {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
  }
  r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "GiB/device" in r.stdout  # the memory estimate, printed before training
  reference = checkpoint(release_run[0], STEPS)
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(  # saved over 8 devices, read onto this process' one
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=one_device), reference
  )
  path = os.path.join(workdir, "checkpoints", str(STEPS), "state")
  ref = flat(reference["params"])
  got = flat(ocp.StandardCheckpointer().restore(path, target)["params"])
  assert ref.keys() == got.keys()
  checked = 0
  for key, value in ref.items():
    name = "/".join(key)
    if ("k_proj" in name or "key" in name) and name.endswith("bias"):
      continue  # exactly zero gradient (softmax ignores it): rounding noise, scaled up by Adam
    np.testing.assert_allclose(got[key], value, atol=1e-4, rtol=0, err_msg=name)
    checked += 1
  assert checked > 100
