"""The SmartEdit trainer (mre/smartedit_train.py) end to end on the toy world: a short run, an exact
resume from its checkpoint, and its export opened by `mre.edit`'s loader and editing an image.

All runs share one tiny configuration (16 px toy data, a 2-level U-Net, the tiny LLaMA/ViT/
Q-Former/BIM), so the train step compiles once and the persistent compilation cache serves the
later runs. A constant learning rate makes a 4-step run followed by a resume to 8 steps the same
recipe as one 8-step run.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import ip2p, smartedit
from mre import model_setup, smartedit_setup, smartedit_train, train
from mre.editor import EditSettings
from mre.model_io.folders import load_any, load_for_editing
from mre.models.reward_config import NULL_SCORE, RewardInputs
from mre.models.reward_unet import RewardUNet
from mre.pipeline import tokenize
from mre.smartedit_editor import SmartEditPipeline, editor_for

STEPS = 8
TINY = {
    "data.config": "tiny",
    "data.resolution": 16,
    "train.batch_per_device": 8,
    "train.log_every": 1,
    "train.checkpoint_every": 4,
    "train.lr_schedule": "constant",
    "train.warmup_steps": 0,
    "train.lr": 1e-2,  # the LM learns the constant answer in 8 steps, so the export can edit
    "train.validate_every": 0,
    "train.val_count": 2,
    "train.val_judge_items": 4,
    "train.val_steps": 2,
    "model.scratch.unet_channels": (16, 32),
    "model.scratch.attention_from_level": 0,
    "model.scratch.heads": 2,
    "model.scratch.text_hidden": 32,
    "model.scratch.text_layers": 1,
    "model.scratch.text_heads": 2,
    "model.smartedit.align_steps": 0,
}


def tiny_config(workdir, data_dir, **overrides):
  c = smartedit.get_config("toy")
  values = {**TINY, "workdir": str(workdir), "data.data_dir": data_dir, "train.steps": STEPS}
  c.update_from_flattened_dict({**values, **overrides})
  return c


def checkpoint(workdir, step=STEPS):
  """A run's saved train state at `step`, as plain nested dicts of arrays."""
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), "state")
  )


def flat(tree):
  """{path: array} with the keys as strings, for checkpoint dicts (whose variables end in a
  "value" key) and pure NNX states alike."""
  out = {}
  for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    out[keys[:-1] if keys[-1] == "value" else keys] = np.asarray(v)
  return out


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, toy_data):
  """The uninterrupted run (validated and exported at its last step)."""
  workdir = tmp_path_factory.mktemp("smartedit_reference")
  summary = train.train(tiny_config(workdir, toy_data, **{"train.validate_every": STEPS}))
  return str(workdir), summary


def test_train_runs_and_both_losses_are_logged(reference_run):
  workdir, summary = reference_run
  assert summary["step"] == STEPS and summary["resumed_from"] == 0
  history = summary["history"]
  assert [h["step"] for h in history] == list(range(1, STEPS + 1))
  for h in history:
    assert all(np.isfinite(h[k]) for k in ("loss", "lm", "diffusion", "grad_norm"))
    np.testing.assert_allclose(h["loss"], h["lm"] + h["diffusion"], rtol=1e-5)
  # The LM learns the constant answer (the template and the 32 <img_k> tokens) at once.
  assert history[-1]["lm"] < history[0]["lm"]
  # Trained parameters move between the two checkpoints, in every trained part.
  mid, end = flat(checkpoint(workdir, 4)["params"]), flat(checkpoint(workdir)["params"])
  assert mid.keys() == end.keys()
  for part in ("unet", "llm", "mm_projector", "sd_qformer", "bim"):
    keys = [k for k in mid if k[0] == part]
    assert keys and any(not np.array_equal(mid[k], end[k]) for k in keys), part
  # The CLIP ViT is not trained (its patches' gradient is stopped, as in the release).
  assert not any(k[0] == "vision_tower" for k in mid)
  # Validation at the last step (the LLM answers all 32 <img_k> tokens by then, greedily): the
  # grid and the toy judge's numbers.
  (record,) = summary["validation"]
  assert record["step"] == STEPS and "skipped" not in record
  assert os.path.exists(os.path.join(workdir, "validation", f"step_{STEPS:06d}.png"))
  assert {"following_yes", "preserving_yes", "quality_yes"} <= set(record["validation"])


def test_resumed_run_continues_exactly(tmp_path, toy_data, reference_run):
  workdir = tmp_path / "resumed"
  first = train.train(tiny_config(workdir, toy_data, **{"train.steps": 4, "train.export": False}))
  assert first["step"] == 4
  second = train.train(tiny_config(workdir, toy_data, **{"train.export": False}))
  assert second["resumed_from"] == 4 and second["step"] == STEPS
  ref, got = flat(checkpoint(reference_run[0])), flat(checkpoint(str(workdir)))
  assert ref.keys() == got.keys()
  for k in ref:  # bitwise: same program, same batches, same step keys
    np.testing.assert_array_equal(ref[k], got[k], err_msg=str(k))
  # Re-running the finished command does nothing.
  again = train.train(tiny_config(workdir, toy_data, **{"train.export": False}))
  assert again["resumed_from"] == STEPS and again["history"] == []


def test_the_alignment_stage_comes_first_and_a_resume_at_its_end_is_exact(tmp_path, toy_data):
  """Two alignment steps (LM + Q-Former MSE to the CLIP context; no U-Net), then two SmartEdit
  steps with a fresh optimizer state; stopped at the end of the alignment and rerun, bitwise the
  same."""
  align = {"model.smartedit.align_steps": 2, "train.checkpoint_every": 2, "train.export": False}
  config = tiny_config(tmp_path / "whole", toy_data, **{**align, "train.steps": 4})
  summary = train.train(config)
  history = summary["history"]
  assert [set(h) >= {"lm", "align"} for h in history] == [True, True, False, False]
  assert [set(h) >= {"lm", "diffusion"} for h in history] == [False, False, True, True]
  for h in history:
    second = h.get("align", h.get("diffusion"))
    np.testing.assert_allclose(h["loss"], h["lm"] + second, rtol=1e-5)
  assert history[1]["align"] < history[0]["align"]
  # The alignment stage leaves the U-Net and BIM exactly as built (no gradient, no weight
  # decay) and trains the LLM and Q-Former; the SmartEdit stage trains the U-Net.
  built = smartedit_setup.build_toy(config, _vocabulary(config), str(tmp_path / "built"))
  start = flat(nnx.to_pure_dict(nnx.state(built.pipe.model, nnx.Param)))
  mid = flat(checkpoint(str(tmp_path / "whole"), 2)["params"])
  end = flat(checkpoint(str(tmp_path / "whole"), 4)["params"])
  for k in (k for k in mid if k[0] in ("unet", "bim")):
    np.testing.assert_array_equal(mid[k], start[k], err_msg=str(k))
  for part in ("llm", "sd_qformer"):
    assert any(not np.array_equal(mid[k], start[k]) for k in mid if k[0] == part), part
  assert any(not np.array_equal(mid[k], end[k]) for k in mid if k[0] == "unet")
  # Stopped after the alignment stage, the rerun starts the SmartEdit stage as the whole run did.
  resumed = tmp_path / "resumed"
  train.train(tiny_config(resumed, toy_data, **{**align, "train.steps": 2}))
  second = train.train(tiny_config(resumed, toy_data, **{**align, "train.steps": 4}))
  assert second["resumed_from"] == 2
  got = flat(checkpoint(str(resumed), 4))
  for k, v in flat(checkpoint(str(tmp_path / "whole"), 4)).items():
    np.testing.assert_array_equal(got[k], v, err_msg=str(k))


def test_the_alignment_term_can_be_kept_in_the_smartedit_stage(tmp_path, toy_data):
  """With `edit_align_loss_weight` the SmartEdit steps get the instruction's CLIP context too and
  log the Q-Former's MSE to it beside the diffusion loss, which the loss includes at that weight."""
  config = tiny_config(
      tmp_path,
      toy_data,
      **{
          "model.smartedit.align_steps": 1,
          "model.smartedit.edit_align_loss_weight": 0.5,
          "train.steps": 2,
          "train.export": False,
      },
  )
  history = train.train(config)["history"]
  assert set(history[0]) >= {"lm", "align"} and "diffusion" not in history[0]
  assert set(history[1]) >= {"lm", "align", "diffusion"}
  h = history[1]
  np.testing.assert_allclose(h["loss"], h["lm"] + h["diffusion"] + 0.5 * h["align"], rtol=1e-5)
  bad = tiny_config(tmp_path / "bad", toy_data, **{"model.smartedit.edit_align_loss_weight": -1.0})
  with pytest.raises(ValueError, match="edit_align_loss_weight"):
    train.train(bad)


def test_export_loads_as_an_editor_folder_and_edits(reference_run):
  workdir, summary = reference_run
  pipe = load_for_editing(summary["export"])
  assert isinstance(pipe, SmartEditPipeline) and type(pipe.vae).__name__ == "PixelSpace"
  # The exported weights are the trained ones.
  trained = flat(checkpoint(workdir)["params"])
  loaded = flat(nnx.to_pure_dict(nnx.state(pipe.model, nnx.Param)))
  for k, v in trained.items():
    np.testing.assert_array_equal(loaded[k], v, err_msg=str(k))
  settings = EditSettings(steps=2, sampler="ddim", text_scale=2.0, image_scale=1.0, resolution=16)
  editor = editor_for(pipe, settings, temperature=0.0, max_new_tokens=64)
  image = np.random.default_rng(0).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
  out = editor.edit_arrays(image, ["make the red square blue"])
  assert out.shape == image.shape and np.isfinite(out).all()


def test_reward_smartedit_starts_from_an_ip2p_editor_and_trains(tmp_path, toy_data):
  """The paper's SmartEdit row in the toy: the U-Net, CLIP text encoder and tokenizer of a
  trained toy InstructPix2Pix editor, a RewardUNet on top, the batch's rewards in the step."""
  stage1 = ip2p.get_config("toy")
  scratch = {k: v for k, v in TINY.items() if k.startswith(("model.scratch", "data."))}
  stage1.update_from_flattened_dict(
      {
          **scratch,
          "workdir": str(tmp_path / "ip2p"),
          "data.data_dir": toy_data,
          "train.steps": 1,
          "train.batch_per_device": 8,
          "train.validate_every": 0,
      }
  )
  ip2p_export = train.train(stage1)["export"]
  start = load_any(ip2p_export)
  c = tiny_config(
      tmp_path / "se",
      toy_data,
      **{"model.pretrained": ip2p_export, "model.reward.enabled": True, "train.steps": 2},
  )
  toy = smartedit_setup.build_toy(c, _vocabulary(c), str(tmp_path / "built"))
  unet = toy.pipe.model.unet
  assert isinstance(unet, RewardUNet)
  kept = flat(nnx.to_pure_dict(nnx.state(start.unet, nnx.Param)))
  built = flat(nnx.to_pure_dict(nnx.state(unet, nnx.Param)))
  for k, v in kept.items():  # every stage-1 weight, the reward modules new
    np.testing.assert_array_equal(built[k], v, err_msg=str(k))
  assert any(k[0] == "reward" for k in built)
  _check_reward_dropout(c, toy.pipe)

  c.model.reward.dropout_prob = 0.5  # the run below trains with reward dropout
  c.model.reward.text_dropout_prob = 0.5
  summary = train.train(c)
  assert summary["step"] == 2 and all(np.isfinite(h["loss"]) for h in summary["history"])
  # A rerun resumes from the checkpoint (the loaded stage-1 weights are host arrays until the
  # first step) and has nothing left to do.
  again = train.train(c)
  assert again["resumed_from"] == 2 and again["history"] == []
  trained = flat(checkpoint(str(tmp_path / "se"), 2)["params"])
  moved = [
      k
      for k in trained
      if k[:2] == ("unet", "reward") and not np.array_equal(trained[k], built[k[1:]])
  ]
  assert moved  # the reward modules learn from the batch's rewards
  pipe = load_for_editing(summary["export"])
  assert isinstance(pipe.model.unet, RewardUNet)
  settings = EditSettings(steps=2, sampler="ddim", text_scale=2.0, image_scale=1.0, resolution=16)
  editor = editor_for(pipe, settings, temperature=0.0, max_new_tokens=64)
  assert editor.is_reward
  image = np.random.default_rng(0).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
  out = editor.edit_arrays(image, ["make the red square blue"])
  assert out.shape == image.shape and np.isfinite(out).all()


def _check_reward_dropout(config, pipe):
  """Reward dropout as the InstructPix2Pix step does it: whole rewards -> the null reward (for
  reward guidance), single failure texts -> the empty text (their scores kept)."""
  assert smartedit_train.reward_dropout(config, pipe) is None  # both probabilities 0
  _, empty = pipe.text_encoder(jax.numpy.asarray(tokenize(pipe.tokenizer, [""])))
  empty = np.asarray(empty).reshape(-1)
  slots = model_setup.reward_config(config).text_slots
  reward = RewardInputs(
      jax.numpy.full((16, 3), 5.0), jax.numpy.ones((16, slots, empty.shape[0]), jax.numpy.float32)
  )
  key = jax.random.key(0)
  c = config.copy_and_resolve_references()
  c.model.reward.dropout_prob = 0.5
  whole = smartedit_train.reward_dropout(c, pipe)(key, reward)
  null = np.all(np.asarray(whole.scores) == NULL_SCORE, axis=1)
  assert 0 < null.sum() < 16  # some samples null, the others untouched, nothing in between
  np.testing.assert_array_equal(np.asarray(whole.scores)[~null], 5.0)
  np.testing.assert_array_equal(np.asarray(whole.text)[~null], 1.0)
  np.testing.assert_allclose(
      np.asarray(whole.text)[null], np.broadcast_to(empty, whole.text[null].shape), atol=1e-6
  )
  c.model.reward.dropout_prob, c.model.reward.text_dropout_prob = 0.0, 0.5
  texts = smartedit_train.reward_dropout(c, pipe)(key, reward)
  np.testing.assert_array_equal(texts.scores, 5.0)  # the scores stay
  dropped = np.all(np.isclose(np.asarray(texts.text), empty, atol=1e-6), axis=-1)
  kept = np.all(np.asarray(texts.text) == 1.0, axis=-1)
  assert np.all(dropped | kept) and 0 < dropped.sum() < dropped.size  # per sample and slot


def _vocabulary(config):
  from mre.data import train_input

  return train_input.open_dataset(config).vocabulary


def test_what_the_trainer_does_not_take_is_named():
  assert smartedit_setup.refusal(smartedit.get_config("toy")) is None
  c = smartedit.get_config("toy")
  c.update_from_flattened_dict(
      {
          "model.reward.enabled": True,
          "model.reward.dropout_prob": 0.1,  # taken (reward guidance needs it)
          "train.grad_accum": 0,
          "train.loss": "pseudo_huber",
      }
  )
  why = smartedit_setup.refusal(c)
  assert "model.reward.dropout_prob" not in why and "train.grad_accum=0" in why
  assert "train.loss='pseudo_huber'" in why
  c.train.grad_accum = 2  # taken: micro-batches
  assert "grad_accum" not in smartedit_setup.refusal(c)
  # The release sizes train from a SmartEdit folder, without the toy's alignment stage.
  full = smartedit.get_config()
  assert "set model.pretrained" in smartedit_setup.refusal(full)
  full.model.pretrained = "/some/smartedit"
  assert smartedit_setup.refusal(full) is None
  full.model.smartedit.align_steps = 10
  assert "align_steps=10" in smartedit_setup.refusal(full)
