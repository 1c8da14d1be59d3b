"""The trainer end to end on the toy world: one run, sharding equivalence, exact resume, 2 processes.

All runs share one tiny configuration (16 px toy data, a 2-level U-Net), so the train step compiles
to the same program everywhere and the persistent compilation cache serves the later runs.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import orbax.checkpoint as ocp
import pytest

from configs import reward
from mre import train
from mre.model_io.folders import load_any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "data.config": "tiny",
    "data.resolution": 16,
    "train.batch_per_device": 8,
    "train.grad_accum": 2,
    "train.log_every": 1,
    "train.validate_every": 0,
    "train.checkpoint_every": 8,  # a checkpoint mid-run (resume tests) and at the end; each save
    # blocks the next for a second or two, so not more
    "train.warmup_steps": 2,
    "model.scratch.unet_channels": (16, 32),
    "model.scratch.heads": 2,
    "model.scratch.attention_from_level": 0,
    "model.scratch.text_hidden": 32,
    "model.scratch.text_layers": 1,
    "model.scratch.text_heads": 2,
    "model.reward.score_dim": 16,
    "model.reward.heads": 2,
    "model.reward.form": "released",
    "model.reward.attn_dropout": 0.1,
    "model.pretrained": "",  # from scratch (the recipe's default starts from stage 1)
}
STEPS = 16


def tiny_config(workdir, data_dir, **overrides):
  c = reward.get_config("toy")
  for key, value in {
      **TINY,
      "workdir": workdir,
      "data.data_dir": data_dir,
      "train.steps": STEPS,
      **overrides,
  }.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


def cli_args(workdir, data_dir, **overrides):
  args = [
      f"--config.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
      for k, v in {**TINY, "data.data_dir": data_dir, "train.steps": STEPS, **overrides}.items()
  ]
  return [
      sys.executable,
      "-m",
      "mre.train",
      "--config=configs/reward.py:toy",
      f"--config.workdir={workdir}",
      *args,
  ]


def final_state(workdir, step=STEPS, like=None):
  """The train state a run saved at `step`, restored onto this process's device."""
  import jax

  path = os.path.join(workdir, "checkpoints", str(step), "state")
  target = None
  if like is not None:  # a checkpoint written by another mesh needs target shardings here
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), like)
  return ocp.StandardCheckpointer().restore(path, target)


def leaves(tree):
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, toy_data):
  """The uninterrupted single-device run every other test compares against."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  summary = train.train(tiny_config(workdir, toy_data, **{"train.validate_every": STEPS}))
  return workdir, summary


def test_train_runs_end_to_end(reference_run, toy_data):
  workdir, summary = reference_run
  assert summary["step"] == STEPS and summary["resumed_from"] == 0
  losses = [h["loss"] for h in summary["history"]]
  assert len(losses) == STEPS and all(np.isfinite(losses))
  assert all(h["images_per_s"] > 0 and h["grad_norm"] > 0 for h in summary["history"])
  # The validation grid: 4 items (rows) x original | edit per reward | reference, 16 px cells at
  # scale 4, and edits that are images, not one flat colour.
  grid = np.asarray(Image.open(os.path.join(workdir, "validation", f"step_{STEPS:06d}.png")))
  assert grid.shape[0] % (16 * 4) == 0 and grid.shape[2] == 3 and grid.std() > 1.0
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  # The toy world has a judge: validation edits are judged in process at every validation.
  (judged,) = summary["validation"]
  assert judged["step"] == STEPS
  metrics = judged["validation"]
  assert set(metrics) == {
      f"{p}_{k}" for p in ("following", "preserving", "quality") for k in ("yes", "score")
  }
  assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if k.endswith("_yes"))
  assert all(0.0 <= metrics[k] <= 5.0 for k in metrics if k.endswith("_score"))
  # The export is a full editor that mre.edit loads; the toy U-Net keeps its source skip, which
  # diffusers would not apply, so no diffusers U-Net is written for it.
  pipe = load_any(os.path.join(workdir, "export"))
  assert type(pipe.unet).__name__ == "RewardUNet" and pipe.unet.config.source_skip
  assert not os.path.exists(os.path.join(workdir, "export_diffusers", "unet"))
  # Re-running the finished command resumes at the end and does nothing.
  again = train.train(tiny_config(workdir, toy_data))
  assert again["resumed_from"] == STEPS and again["history"] == []


def test_sharded_run_matches_single_device(tmp_path, toy_data, reference_run):
  """8 fake CPU devices on a (data 4, fsdp 2) mesh, the same global batch: the same parameters."""
  workdir = str(tmp_path / "sharded")
  env = {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
  }
  r = subprocess.run(
      cli_args(
          workdir,
          toy_data,
          **{
              "mesh.data": 4,
              "mesh.fsdp": 2,
              "mesh.fsdp_min_size": 512,
              "train.batch_per_device": 1,
              "train.export": False,
          },
      ),
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  import jax

  ref_state = final_state(reference_run[0])
  ref = jax.tree_util.tree_flatten_with_path(ref_state)[0]
  got = leaves(final_state(workdir, like=ref_state))
  assert len(ref) == len(got)
  checked = 0
  for (path, a), b in zip(ref, got):
    name = jax.tree_util.keystr(path)
    # Softmax ignores a bias added to every key, so these biases have an exactly zero gradient;
    # what they get is rounding noise (different on every mesh), which Adam scales up to +-lr.
    if ("k_proj" in name or "'key'" in name) and "'bias'" in name:
      continue
    # A tenth of one Adam step (lr 1e-3): Adam divides by sqrt(v), so parameters with tiny,
    # rare gradients (unused token rows) turn reduction-order noise into visible differences.
    np.testing.assert_allclose(np.asarray(a), b, atol=1e-4, rtol=0, err_msg=name)
    checked += 1
  assert checked > 100


def test_sigkill_and_rerun_resumes_exactly(tmp_path, toy_data, reference_run):
  workdir = str(tmp_path / "killed")
  args = cli_args(workdir, toy_data, **{"train.export": False})
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(
      args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  first = os.path.join(workdir, "checkpoints", str(TINY["train.checkpoint_every"]))
  deadline = time.time() + 300
  while not os.path.isdir(first) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert done and max(done) < STEPS, f"the run was not killed mid-way (checkpoints {done})"
  r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resuming from step" in r.stdout
  for a, b in zip(leaves(final_state(reference_run[0])), leaves(final_state(workdir))):
    np.testing.assert_array_equal(a, b)  # bitwise: same program, same data, same step keys


def test_sigterm_saves_and_exits_cleanly(tmp_path, toy_data):
  workdir = str(tmp_path / "terminated")
  proc = subprocess.Popen(
      cli_args(workdir, toy_data, **{"train.steps": 10_000, "train.checkpoint_every": 10_000}),
      cwd=ROOT,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  tb = os.path.join(workdir, "tensorboard")
  deadline = time.time() + 300
  while (
      time.time() < deadline
      and proc.poll() is None
      and not (
          os.path.isdir(tb)
          and os.listdir(tb)
          and os.path.getsize(os.path.join(tb, os.listdir(tb)[0])) > 200
      )
  ):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "checkpoint saved, rerun the command to resume" in out
  steps = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
  assert steps and 0 < max(steps) < 10_000


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_together(tmp_path, toy_data):
  workdir = str(tmp_path / "multi")
  port = _free_port()
  procs = []
  for pid in range(2):
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": str(pid),
    }
    procs.append(
        subprocess.Popen(
            cli_args(
                workdir,
                toy_data,
                **{
                    "train.steps": 3,
                    "train.checkpoint_every": 3,
                    "train.batch_per_device": 4,
                    "train.export": False,
                },
            ),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    )
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "trained 3 steps" in outs[0][0]
  with open(os.path.join(workdir, "train_summary.json")) as f:
    assert json.load(f)["step"] == 3
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, toy_data):
  """An absurd learning rate blows the parameters up; the guard keeps the last good state."""
  c = tiny_config(
      str(tmp_path / "nan"),
      toy_data,
      **{"train.lr": 1e38, "train.steps": 4, "train.checkpoint_every": 1},
  )
  with pytest.raises(train.NonFiniteError, match="is not finite; the update was skipped"):
    train.train(c)


def _from_pipeline_config(workdir, data_dir, pipeline_dir, precompute):
  c = reward.get_config()  # the paper's recipe, shrunk: a stage-1 folder on disk, toy data
  for key, value in {
      "workdir": workdir,
      "model.pretrained": pipeline_dir,
      "data.name": "toy_edit",
      "data.config": "tiny",
      "data.data_dir": data_dir,
      "data.resolution": 16,
      "data.random_flip": False,
      "data.precompute_latents": precompute,
      "model.dtype": "float32",
      "model.remat": (),
      "train.batch_per_device": 4,
      "train.grad_accum": 1,
      "train.steps": 3,
      "train.validate_every": 0,
      "train.export": False,
      "train.log_every": 1,
      "train.lr": 1e-3,
  }.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


def test_stage2_from_a_pipeline_folder_with_and_without_cached_latents(
    tmp_path, toy_data, tiny_pipeline_dir
):
  plain = train.train(
      _from_pipeline_config(str(tmp_path / "plain"), toy_data, tiny_pipeline_dir, False)
  )
  cached_dir = str(tmp_path / "cached")
  cached = train.train(_from_pipeline_config(cached_dir, toy_data, tiny_pipeline_dir, True))
  with open(os.path.join(cached_dir, "latent_cache", "meta.json")) as f:
    meta = json.load(f)
  assert meta["done"] == meta["records"] == 48 and meta["latent_shape"] == [8, 8, 4]
  a = [h["loss"] for h in plain["history"]]
  b = [h["loss"] for h in cached["history"]]
  assert len(a) == len(b) == 3
  np.testing.assert_allclose(a, b, rtol=1e-4)  # same latents, same posterior samples


def test_latent_cache_resumes_a_partial_build(tmp_path, toy_data, tiny_pipeline_dir):
  import tensorflow_datasets as tfds
  from mre.data import latent_cache
  from mre.model_io import diffusers_folder

  vae = diffusers_folder.load_vae(os.path.join(tiny_pipeline_dir, "vae"))
  source = tfds.data_source("toy_edit/tiny", split="train", data_dir=toy_data)
  full = str(tmp_path / "full")
  latent_cache.build(vae, source, full, 16, batch_size=16)
  part = str(tmp_path / "part")
  latent_cache.build(vae, source, part, 16, batch_size=16)
  with open(os.path.join(part, "meta.json")) as f:
    meta = json.load(f)
  meta["done"] = 16  # as if killed after the first chunk
  with open(os.path.join(part, "meta.json"), "w") as f:
    json.dump(meta, f)
  arr = np.load(os.path.join(part, "edited_mean.npy"), mmap_mode="r+")
  arr[16:] = 0.0
  arr.flush()
  latent_cache.build(vae, source, part, 16, batch_size=16)
  for name in latent_cache.ARRAYS:
    np.testing.assert_array_equal(
        np.load(os.path.join(part, name + ".npy")), np.load(os.path.join(full, name + ".npy"))
    )
  record = latent_cache.LatentSource(source, part)[3]
  assert "original" not in record and record["original_latent"].shape == (8, 8, 4)
  with pytest.raises(ValueError, match="another dataset or resolution"):
    latent_cache.build(vae, source, part, 32)
