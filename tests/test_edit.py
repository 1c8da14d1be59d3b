"""Editing end to end: parity with diffusers' InstructPix2Pix pipeline, the CLI, reward inference."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mre.editor import EditSettings, Editor, fit_size
from mre.model_io import diffusers_folder
from mre.models.reward_config import RewardConfig
from mre.models.reward_unet import reward_unet_from_stage1
from tests.reference import nhwc, torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image(seed=0, size=16):
  rs = np.random.RandomState(seed)
  return Image.fromarray(rs.randint(0, 256, (size, size, 3), dtype=np.uint8))


def test_edit_matches_the_diffusers_pipeline(tiny_pipeline_dir):
  from diffusers import EulerDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

  ref = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_pipeline_dir)
  ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
  ref.set_progress_bar_config(disable=True)
  img, prompt = _image(), "turn the red circle blue"
  noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
  want = ref(
      prompt,
      image=img,
      num_inference_steps=6,
      guidance_scale=7.5,
      image_guidance_scale=1.5,
      latents=noise,
      output_type="np",
  ).images

  pipe = diffusers_folder.load_pipeline(tiny_pipeline_dir)
  pipe.scheduler_config = dict(ref.scheduler.config)
  editor = Editor(pipe, EditSettings(steps=6, sampler="euler", resolution=16))
  x = np.asarray(img, np.float32)[None] / 127.5 - 1
  got = editor.edit_arrays(x, [prompt], noise=nhwc(noise.numpy()))
  got = np.clip(got / 2 + 0.5, 0, 1)
  assert got.shape == want.shape == (1, 16, 16, 3)
  np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


def test_fit_size_rounds_the_long_side_like_the_paper():
  assert fit_size(1024, 768, 512, 64) == (512, 384)
  assert fit_size(640, 427, 512, 64) == (512, 320)  # 341.6 -> 320
  assert fit_size(100, 4000, 512, 64) == (64, 512)  # never below one multiple


def _cli(*args):
  return subprocess.run(
      [sys.executable, "-m", "mre.edit", *args],
      cwd=ROOT,
      text=True,
      capture_output=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )


def test_cli_edits_single_and_batch(tmp_path, tiny_pipeline_dir):
  _image(1).save(tmp_path / "a.png")
  _image(2, 24).save(tmp_path / "b.png")
  r = _cli(
      f"--model={tiny_pipeline_dir}",
      f"--image={tmp_path / 'a.png'}",
      "--instruction=make it darker",
      f"--output={tmp_path / 'out.png'}",
      "--steps=3",
      "--resolution=16",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert "s/image" in r.stdout
  assert Image.open(tmp_path / "out.png").size == (16, 16)
  with open(tmp_path / "pairs.jsonl", "w") as f:
    f.write(json.dumps({"image": "a.png", "instruction": "turn the red circle blue"}) + "\n")
    f.write(json.dumps({"image": "b.png", "instruction": "make it darker"}) + "\n")
  r = _cli(
      f"--model={tiny_pipeline_dir}",
      f"--image={tmp_path / 'pairs.jsonl'}",
      f"--output={tmp_path / 'batch'}",
      "--steps=2",
      "--resolution=16",
      "--sampler=ddim",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / "batch")) == ["00001_a.png", "00002_b.png"]


def test_cli_errors_are_clear(tmp_path, tiny_pipeline_dir):
  (tmp_path / "bad.png").write_bytes(b"not a png")
  _image().save(tmp_path / "ok.png")
  r = _cli(f"--model={tiny_pipeline_dir}", f"--image={tmp_path / 'bad.png'}", "--instruction=x")
  assert r.returncode != 0 and "cannot read image" in r.stderr and "bad.png" in r.stderr
  r = _cli(f"--model={tmp_path / 'missing'}", f"--image={tmp_path / 'ok.png'}", "--instruction=x")
  assert r.returncode != 0 and "does not exist" in r.stderr
  r = _cli(f"--model={tiny_pipeline_dir}", f"--image={tmp_path / 'ok.png'}", "--instruction= ")
  assert r.returncode != 0 and "--instruction is empty" in r.stderr
  r = _cli(
      f"--model={tiny_pipeline_dir}",
      f"--image={tmp_path / 'ok.png'}",
      "--instruction=x",
      "--reward=5,5",
  )
  assert r.returncode != 0 and "three scores" in r.stderr
  r = _cli(
      f"--model={tiny_pipeline_dir}",
      f"--image={tmp_path / 'ok.png'}",
      "--instruction=x",
      "--reward-guidance-away=1,1,1",
  )
  assert r.returncode != 0 and "needs --reward-guidance" in r.stderr
  r = _cli(
      f"--model={tiny_pipeline_dir}",
      f"--image={tmp_path / 'ok.png'}",
      "--instruction=x",
      "--reward-guidance=2",
      "--reward-guidance-away=1,1,1",
      "--reward-guidance-away-text=blurry",
  )
  assert r.returncode != 0 and "three times" in r.stderr


def test_reward_model_edits_follow_the_reward(tmp_path, tiny_pipeline_dir):
  pipe = diffusers_folder.load_pipeline(tiny_pipeline_dir)
  stage1_unet = pipe.unet
  img = [_image(3)]
  settings = EditSettings(steps=3, resolution=16, seed=1)
  base = np.asarray(Editor(pipe, settings).edit(img, ["make it darker"])[0])

  # Paper form starts as the stage-1 model: same edit whatever the reward.
  pipe.unet = reward_unet_from_stage1(stage1_unet, RewardConfig(form="paper"), seed=0)
  for scores in [(5, 5, 5), (0, 1, 2)]:
    s = EditSettings(steps=3, resolution=16, seed=1, reward_scores=scores)
    np.testing.assert_array_equal(
        np.asarray(Editor(pipe, s).edit(img, ["make it darker"])[0]), base
    )

  # A released-form model (random reward modules) reacts to the reward; the CLI passes it through.
  pipe.unet = reward_unet_from_stage1(stage1_unet, RewardConfig(form="released"), seed=0)
  pipe.unet.eval()
  folder = str(tmp_path / "reward_pipe")
  diffusers_folder.save_pipeline(pipe, folder)
  img[0].save(tmp_path / "in.png")
  outs = []
  for scores in ["5,5,5", "0,0,0"]:
    r = _cli(
        f"--model={folder}",
        f"--image={tmp_path / 'in.png'}",
        "--instruction=make it darker",
        f"--output={tmp_path / (scores + '.png')}",
        "--steps=3",
        "--resolution=16",
        f"--reward={scores}",
        "--reward-text=None",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    outs.append(np.asarray(Image.open(tmp_path / (scores + ".png")), np.float32))
  assert np.abs(outs[0] - outs[1]).max() > 2


def test_reward_guidance_adds_a_branch_with_the_null_reward(tiny_pipeline_dir):
  pipe = diffusers_folder.load_pipeline(tiny_pipeline_dir)
  pipe.unet = reward_unet_from_stage1(
      pipe.unet, RewardConfig(form="released", dropout_prob=0.1), seed=0
  )
  img = [_image(4)]
  plain = Editor(pipe, EditSettings(steps=3, resolution=16, seed=2))
  guided = Editor(pipe, EditSettings(steps=3, resolution=16, seed=2, reward_scale=2.0))
  null = guided.null_reward(1)
  assert float(null.scores[0, 0]) == -1.0
  a = np.asarray(plain.edit(img, ["make it darker"])[0], np.float32)
  b = np.asarray(guided.edit(img, ["make it darker"])[0], np.float32)
  assert np.abs(a - b).max() > 2  # the fourth branch changes the result
  with pytest.raises(ValueError, match="reward-conditioned model"):
    Editor(diffusers_folder.load_pipeline(tiny_pipeline_dir), EditSettings(reward_scale=2.0))


def test_guidance_away_from_a_negative_reward(tiny_pipeline_dir):
  pipe = diffusers_folder.load_pipeline(tiny_pipeline_dir)
  pipe.unet = reward_unet_from_stage1(pipe.unet, RewardConfig(form="released"), seed=0)
  img = [_image(4)]

  def edit(**settings):
    editor = Editor(pipe, EditSettings(steps=3, resolution=16, seed=2, **settings))
    return np.asarray(editor.edit(img, ["make it darker"])[0], np.float32)

  plain = edit()
  # Guiding away from the very reward it is conditioned on adds nothing.
  same = edit(reward_scale=2.0, reward_negative_scores=(5, 5, 5))
  assert np.abs(plain - same).max() <= 1
  away = edit(reward_scale=2.0, reward_negative_scores=(0, 0, 0))
  assert np.abs(plain - away).max() > 2
  with pytest.raises(ValueError, match="needs reward_scale"):
    Editor(pipe, EditSettings(reward_negative_scores=(1, 1, 1)))
  # Its texts: None keeps the conditioning text, so all-None is the same reward again; a named
  # failure text (the released form reads the quality slot's text) makes it another one.
  kept = edit(reward_scale=2.0, reward_negative_scores=(5, 5, 5), reward_negative_texts=(None,) * 3)
  assert np.abs(plain - kept).max() <= 1
  named = edit(
      reward_scale=2.0,
      reward_negative_scores=(5, 5, 5),
      reward_negative_texts=("the image is blurry",) * 3,
  )
  assert np.abs(plain - named).max() > 2
  s = EditSettings(
      reward_scale=1.0, reward_negative_scores=(1, 1, 1), reward_negative_texts=(None, "", "x")
  )
  assert s.negative_texts(("a", "b", "c")) == ("a", "", "x")
  with pytest.raises(ValueError, match="needs reward_negative_scores"):
    EditSettings(reward_scale=1.0, reward_negative_texts=(None, None, "x"))
  with pytest.raises(ValueError, match="3 texts"):
    EditSettings(reward_scale=1.0, reward_negative_scores=(1, 1, 1), reward_negative_texts=("x",))
