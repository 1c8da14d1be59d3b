"""Evaluation end to end through the toy judge server: reports, recomputed numbers, resume, sweeps."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import reward
from data_prep.judge_client import Endpoint, JudgeClient, RetryPolicy
from data_prep.toy.judge_server import serve_in_thread
from mre import evaluation, model_setup
from mre.editor import EditSettings, Editor
from mre.models.native import save_native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = "toy_edit/tiny"


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
  """A random tiny reward editor in the toy world's format (what a toy training run exports)."""
  from data_prep.toy.vocabulary import vocabulary
  c = reward.get_config("toy")
  c.model.scratch.unet_channels, c.model.scratch.text_hidden = (16, 32), 32
  c.model.scratch.heads, c.model.scratch.text_heads, c.model.reward.heads = 2, 2, 2
  c.model.scratch.attention_from_level = 0
  c.model.reward.score_dim, c.data.resolution = 16, 16
  root = tmp_path_factory.mktemp("toy_model")
  pipe = model_setup.build_scratch(c, vocabulary(), str(root / "tok"), abstract=False)
  save_native(pipe, str(root / "model"))
  return pipe, str(root / "model")


def _recompute(path):
  recs = [json.loads(line) for line in open(path)]
  ok = [r for r in recs if r["status"] == "ok"]
  return len(recs), {p: (np.mean([r[p]["yes"] for r in ok]), np.mean([r[p]["score"] for r in ok]))
                     for p in evaluation.PERSPECTIVES}


def test_evaluate_through_the_judge_server_and_resume(tmp_path, toy_data, toy_model):
  pipe, _ = toy_model
  items = evaluation.load_benchmark(BENCH, toy_data, limit=6)
  assert len(items) == 6 and {it.category for it in items} <= {"local", "remove", "add",
                                                               "background", "global"}
  editor = Editor(pipe, EditSettings(steps=2, sampler="ddim", resolution=16, text_scale=2.0,
                                     image_scale=1.0))
  out = str(tmp_path / "eval")
  with serve_in_thread() as server:
    judge = JudgeClient.from_endpoint(Endpoint(provider="compatible", base_url=server.base_url),
                                      RetryPolicy())
    summary = evaluation.evaluate(editor, items, judge, "toy", out, reward_scores=(5, 5, 5))
    n, recomputed = _recompute(os.path.join(out, "results.jsonl"))
    assert n == 6 and summary["all"]["n"] + summary["all"]["failed"] == 6
    for p, (yes, score) in recomputed.items():
      assert summary["all"][p]["yes_rate"] == pytest.approx(yes)
      assert summary["all"][p]["score"] == pytest.approx(score)
    assert json.load(open(os.path.join(out, "summary.json"))) == json.loads(json.dumps(summary))
    for f in ("summary.md", "summary.csv", "gallery.html"):
      assert os.path.getsize(os.path.join(out, f)) > 100
    assert sum(1 for _ in open(os.path.join(out, "summary.csv"))) == 1 + len(summary)

    # A kill mid-run leaves finished lines and a torn one; the rerun judges only what is missing
    # and does not re-edit cached images.
    lines = open(os.path.join(out, "results.jsonl")).read().splitlines()
    with open(os.path.join(out, "results.jsonl"), "w") as f:
      f.write("\n".join(lines[:4]) + "\n" + lines[4][:25])
    images = os.path.join(out, "images")
    stamps = {f: os.path.getmtime(os.path.join(images, f)) for f in os.listdir(images)}
    before = judge.stats["requests"]
    evaluation.evaluate(editor, items, judge, "toy", out, reward_scores=(5, 5, 5))
    assert judge.stats["requests"] - before == 2 * 3  # two items x three perspectives
    assert stamps == {f: os.path.getmtime(os.path.join(images, f)) for f in os.listdir(images)}
    ids = [json.loads(line)["id"] for line in open(os.path.join(out, "results.jsonl"))]
    assert sorted(ids) == sorted(it.id for it in items)  # each id exactly once


def test_eval_cli_runs_a_reward_sweep_with_the_toy_judge(tmp_path, toy_data, toy_model):
  _, model_dir = toy_model
  out = str(tmp_path / "sweep")
  r = subprocess.run([sys.executable, "-m", "mre.eval", f"--model={model_dir}",
                      f"--benchmark={BENCH}", f"--data_dir={toy_data}", "--toy_judge",
                      "--rewards=5,5,5;1,1,1", "--steps=2", "--sampler=ddim", "--limit=4",
                      f"--output={out}"], cwd=ROOT, capture_output=True, text=True,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["reward_1-1-1", "reward_5-5-5", "sweep.md"]
  table = open(os.path.join(out, "sweep.md")).read()
  assert "| 5,5,5 |" in table and "| 1,1,1 |" in table
  assert "evaluated 4 items x 2 setting(s)" in r.stdout


def test_cached_edits_are_not_reused_for_other_settings(tmp_path, toy_data, toy_model):
  pipe, _ = toy_model
  items = evaluation.load_benchmark(BENCH, toy_data, limit=2)
  out = str(tmp_path / "eval")
  with serve_in_thread() as server:
    judge = JudgeClient.from_endpoint(Endpoint(provider="compatible", base_url=server.base_url),
                                      RetryPolicy())
    editor = Editor(pipe, EditSettings(steps=2, sampler="ddim", resolution=16))
    evaluation.evaluate(editor, items, judge, "toy", out, model_id="m1")
    with pytest.raises(ValueError, match="choose another output folder"):
      evaluation.evaluate(editor, items, judge, "toy", out, model_id="m2")
