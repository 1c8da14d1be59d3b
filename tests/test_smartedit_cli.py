"""mre.edit and mre.eval with a SmartEdit editor folder (the release's files + smartedit.json), as
with an InstructPix2Pix one: a tiny random multi-reward SmartEdit written to disk here, edited and
evaluated in-process (`run(argv)`) with the toy judge; every missing piece of a folder named."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from mre import edit, eval as eval_command
from mre.model_io import smartedit_folder as sf
from mre.models.reward_config import RewardConfig
from tests import smartedit_fixtures as fx

STEP = 5


@pytest.fixture(scope="module")
def editor_folder(tmp_path_factory):
  """A released-form reward SmartEdit (random reward modules: the reward changes the edit)."""
  reward = RewardConfig(form="released", heads=2, score_dim=16)
  model = fx.rigged_model(config=fx.editor_config(), reward=reward)
  return fx.write_editor_folder(tmp_path_factory.mktemp("smartedit"), model, step=STEP)


def _images(folder):
  os.makedirs(folder)
  rs = np.random.RandomState(0)
  Image.fromarray(rs.randint(0, 256, (16, 16, 3), np.uint8)).save(os.path.join(folder, "a.png"))
  Image.fromarray(rs.randint(0, 256, (32, 32, 3), np.uint8)).save(os.path.join(folder, "b.png"))
  return folder


def _edit(model, images, out, seed):
  return edit.run(
      [
          f"--model={model}",
          f"--image={images}",
          "--instruction=make it red",
          f"--output={out}",
          "--steps=2",
          "--sampler=ddim",
          "--resolution=16",
          "--batch-size=2",
          f"--seed={seed}",
      ]
  )


def test_edit_with_a_smartedit_folder_is_sized_and_deterministic(tmp_path, editor_folder):
  images = _images(str(tmp_path / "in"))
  first = _edit(editor_folder, images, tmp_path / "out1", seed=3)
  assert [os.path.basename(p) for p in first] == ["a.png", "b.png"]
  pixels = [np.asarray(Image.open(p)) for p in first]
  assert all(p.shape == (16, 16, 3) for p in pixels)  # the 32 px image at --resolution=16
  assert all(p.reshape(-1, 3).std(axis=0).max() > 0 for p in pixels)  # not one flat colour
  again = [np.asarray(Image.open(p)) for p in _edit(editor_folder, images, tmp_path / "out2", 3)]
  for a, b in zip(pixels, again):
    np.testing.assert_array_equal(a, b)
  other = [np.asarray(Image.open(p)) for p in _edit(editor_folder, images, tmp_path / "out3", 4)]
  assert any(np.abs(a.astype(int) - b).max() > 0 for a, b in zip(pixels, other))


def test_eval_with_a_smartedit_folder_runs_a_reward_sweep(tmp_path, toy_data, editor_folder):
  out = str(tmp_path / "eval")
  results = eval_command.run(
      [
          f"--model={editor_folder}",
          "--benchmark=toy_edit/tiny",
          f"--data_dir={toy_data}",
          "--toy_judge",
          "--rewards=5,5,5;1,1,1",
          "--steps=2",
          "--sampler=ddim",
          "--limit=2",
          "--batch-size=2",
          "--llm_temperature=0",
          f"--output={out}",
      ]
  )
  assert set(results) == {"5,5,5", "1,1,1"}
  assert sorted(os.listdir(out)) == ["reward_1-1-1", "reward_5-5-5", "sweep.md"]
  edited = {}
  for name in ("reward_5-5-5", "reward_1-1-1"):
    folder = os.path.join(out, name)
    records = [json.loads(line) for line in open(os.path.join(folder, "results.jsonl"))]
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    settings = json.load(open(os.path.join(folder, "provenance.json")))["settings"]
    assert settings["temperature"] == 0 and settings["max_new_tokens"] == 96
    files = sorted(os.listdir(os.path.join(folder, "images")))
    edited[name] = [np.asarray(Image.open(os.path.join(folder, "images", f))) for f in files]
    assert [e.shape for e in edited[name]] == [(16, 16, 3)] * 2  # toy_edit/tiny is 16 px
  # The released form's random reward modules: the reward changes the edit.
  assert any(
      np.abs(a.astype(int) - b).max() > 0
      for a, b in zip(edited["reward_5-5-5"], edited["reward_1-1-1"])
  )


def test_every_missing_piece_is_named(tmp_path, editor_folder):
  bare = tmp_path / "bare"  # the release's files without modulate-S/ and smartedit.json
  bare.mkdir()
  for name in (f"LLM-{STEP}", "embeddings_qformer", f"unet-{STEP}"):
    os.symlink(os.path.join(editor_folder, name), bare / name)
  with pytest.raises(FileNotFoundError) as e:
    _edit(str(bare), _images(str(tmp_path / "in")), tmp_path / "out", seed=0)
  text = str(e.value)
  for piece in (
      f"modulate-{STEP}/adapter_model.safetensors or .bin",
      "no clip",
      "no ip2p",
      "no llm_tokenizer",
      "--smartedit_clip",
  ):
    assert piece in text, piece
  # Flags fill what smartedit.json lacks; a folder lacking files is named with them.
  ip2p = tmp_path / "ip2p"
  (ip2p / "vae").mkdir(parents=True)
  options = {"clip": os.path.join(editor_folder, "..", "clip"), "ip2p": str(ip2p)}
  with pytest.raises(FileNotFoundError) as e:
    sf.editor_options(str(bare), {**options, "base_llm": str(tmp_path / "missing")})
  text = str(e.value)
  assert "no clip" not in text and "no llm_tokenizer" not in text  # base_llm is its default
  assert f"base_llm folder {tmp_path / 'missing'} does not exist" in text
  for piece in ("vae/config.json", "vae/ weights", "text_encoder/config.json", "scheduler/*.json"):
    assert piece in text, piece
  # A folder that is no editor is refused by load_any's callers with its three formats.
  with pytest.raises(FileNotFoundError, match="nor a SmartEdit editor folder"):
    _edit(str(tmp_path / "in"), str(tmp_path / "in"), tmp_path / "out", seed=0)


def test_smartedit_flags_give_the_json_entries():
  from absl import flags

  from mre import cli_flags

  fv = flags.FlagValues()
  holders = cli_flags.define_smartedit_flags(flag_values=fv)
  assert cli_flags.define_smartedit_flags(flag_values=fv) is holders
  fv(["cmd", "--smartedit_clip=/m/clip", "--smartedit_step=7", "--llm_temperature=0"])
  assert holders.overrides() == {"clip": "/m/clip", "step": 7}
  assert holders.llm_settings() == {"temperature": 0.0, "max_new_tokens": 96}
