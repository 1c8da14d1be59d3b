"""Evaluation end to end through the toy judge server: reports, recomputed numbers, resume, sweeps,
and judging against a judge with faults."""

import csv
import html
import json
import os
import re
import subprocess
import sys

import numpy as np
import openai
import pytest
from PIL import Image

from configs import reward
from data_prep.toy import judge_server
from data_prep.toy.judge_server import serve_in_thread
from mre import evaluation, model_setup
from mre.editor import EditSettings, Editor
from mre.judging.client import Endpoint, JudgeClient, JudgeUnavailable, RetryPolicy
from mre.model_io.native_format import save_native

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
  return len(recs), {
      p: (np.mean([r[p]["yes"] for r in ok]), np.mean([r[p]["score"] for r in ok]))
      for p in evaluation.PERSPECTIVES
  }


def _recompute_rows(path):
  """{group: [n, failed, yes-rate, score, ...]} from a results JSONL, written out independently of
  evaluation.summarize: "all" and one group per category, perspectives in the fixed order."""
  recs = [json.loads(line) for line in open(path)]
  groups = {"all": recs}
  for r in recs:
    groups.setdefault(r["category"], []).append(r)
  rows = {}
  for name, group in groups.items():
    ok = [r for r in group if r["status"] == "ok"]
    row = [len(ok), len(group) - len(ok)]
    for p in ("following", "preserving", "quality"):
      row += [sum(r[p]["yes"] for r in ok) / len(ok), sum(r[p]["score"] for r in ok) / len(ok)]
    rows[name] = row
  return rows


def _markdown_rows(text):
  """{first cell: other cells} of the data rows of a markdown table."""
  lines = [line for line in text.splitlines() if line.startswith("|")]
  cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[2:]]
  return {row[0]: row[1:] for row in cells}


def _formatted(values):
  """Yes-rates and scores as the reports print them."""
  return [f"{v:.1%}" if i % 2 == 0 else f"{v:.2f}" for i, v in enumerate(values)]


def _check_reports(out, items):
  """summary.md, summary.csv and gallery.html hold what results.jsonl says, row by row."""
  expected = _recompute_rows(os.path.join(out, "results.jsonl"))
  table = _markdown_rows(open(os.path.join(out, "summary.md")).read())
  assert set(table) == set(expected)
  for name, row in expected.items():
    assert table[name] == [str(row[0]), str(row[1])] + _formatted(row[2:]), name
  with open(os.path.join(out, "summary.csv")) as f:
    header, *lines = list(csv.reader(f))
  assert header == evaluation.HEADER
  assert {line[0] for line in lines} == set(expected)
  for line in lines:
    row = expected[line[0]]
    assert [int(line[1]), int(line[2])] == row[:2], line
    np.testing.assert_allclose([float(v) for v in line[3:]], row[2:], rtol=1e-12, err_msg=line[0])
  # The gallery: one row per item, its verdicts as judged, and images that decode to the edit size.
  page = open(os.path.join(out, "gallery.html")).read()
  rows = re.findall(r"<tr><td>(.*?)</tr>", page)
  assert len(rows) == len(items)
  records = {
      json.loads(line)["id"]: json.loads(line) for line in open(os.path.join(out, "results.jsonl"))
  }
  for it, row in zip(items, rows):
    assert row.startswith(html.escape(it.id) + "<br>") and html.escape(it.instruction) in row
    rec = records[it.id]
    for p in evaluation.PERSPECTIVES:
      verdict = (
          f"{p}: {'yes' if rec[p]['yes'] else 'no'}, {rec[p]['score']:.1f}"
          if "yes" in rec[p]
          else f"{p}: failed ("
      )
      assert verdict in row, (it.id, p)
    original, edited = re.findall(r"<img src='([^']+)'>", row)
    original = np.asarray(Image.open(os.path.join(out, html.unescape(original))).convert("RGB"))
    np.testing.assert_array_equal(original, it.original)
    edited = np.asarray(Image.open(os.path.join(out, html.unescape(edited))).convert("RGB"))
    assert edited.shape == it.original.shape
    assert edited.reshape(-1, 3).std(axis=0).max() > 0  # an image, not one flat colour


def test_evaluate_through_the_judge_server_and_resume(tmp_path, toy_data, toy_model):
  pipe, _ = toy_model
  items = evaluation.load_benchmark(BENCH, toy_data, limit=6)
  assert len(items) == 6 and {it.category for it in items} <= {
      "local",
      "remove",
      "add",
      "background",
      "global",
  }
  editor = Editor(
      pipe, EditSettings(steps=2, sampler="ddim", resolution=16, text_scale=2.0, image_scale=1.0)
  )
  out = str(tmp_path / "eval")
  with serve_in_thread() as server:
    judge = JudgeClient.from_endpoint(
        Endpoint(provider="compatible", base_url=server.base_url), RetryPolicy()
    )
    summary = evaluation.evaluate(editor, items, judge, "toy", out, reward_scores=(5, 5, 5))
    n, recomputed = _recompute(os.path.join(out, "results.jsonl"))
    assert n == 6 and summary["all"]["n"] + summary["all"]["failed"] == 6
    for p, (yes, score) in recomputed.items():
      assert summary["all"][p]["yes_rate"] == pytest.approx(yes)
      assert summary["all"][p]["score"] == pytest.approx(score)
    assert json.load(open(os.path.join(out, "summary.json"))) == json.loads(json.dumps(summary))
    _check_reports(out, items)

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
  r = subprocess.run(
      [
          sys.executable,
          "-m",
          "mre.eval",
          f"--model={model_dir}",
          f"--benchmark={BENCH}",
          f"--data_dir={toy_data}",
          "--toy_judge",
          "--rewards=5,5,5;1,1,1",
          "--steps=2",
          "--sampler=ddim",
          "--limit=4",
          f"--output={out}",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
      timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["reward_1-1-1", "reward_5-5-5", "sweep.md"]
  # One row per setting, each the overall numbers of its own results.jsonl.
  table = _markdown_rows(open(os.path.join(out, "sweep.md")).read())
  assert set(table) == {"5,5,5", "1,1,1"}
  for name, folder in (("5,5,5", "reward_5-5-5"), ("1,1,1", "reward_1-1-1")):
    assert table[name] == _formatted(
        _recompute_rows(os.path.join(out, folder, "results.jsonl"))["all"][2:]
    )
  assert "evaluated 4 items x 2 setting(s)" in r.stdout


def test_cached_edits_are_not_reused_for_other_settings(tmp_path, toy_data, toy_model):
  pipe, _ = toy_model
  items = evaluation.load_benchmark(BENCH, toy_data, limit=2)
  out = str(tmp_path / "eval")
  with serve_in_thread() as server:
    judge = JudgeClient.from_endpoint(
        Endpoint(provider="compatible", base_url=server.base_url), RetryPolicy()
    )
    editor = Editor(pipe, EditSettings(steps=2, sampler="ddim", resolution=16))
    evaluation.evaluate(editor, items, judge, "toy", out, model_id="m1")
    with pytest.raises(ValueError, match="choose another output folder"):
      evaluation.evaluate(editor, items, judge, "toy", out, model_id="m2")


# Judging against a faulty judge (issue 14): the same failure classes as annotation, same client.


def _judged_items(toy_data, folder, n=8):
  """n benchmark items, each with an "edited" image of its own (the original, one pixel marked)."""
  items = evaluation.load_benchmark(BENCH, toy_data, limit=n)
  paths = {}
  for k, it in enumerate(items):
    edited = it.original.copy()
    edited[0, 0] = (k * 29 % 256, 255 - k, 7)
    paths[it.id] = str(folder / f"{k}.png")
    Image.fromarray(edited).save(paths[it.id])
  return items, paths


def _judge(server, **kw):
  policy = RetryPolicy(max_attempts=3, initial_delay=0.001, max_delay=0.01, reasks=2)
  client = openai.OpenAI(base_url=server.base_url, api_key="toy", timeout=kw.pop("timeout", 5))
  return JudgeClient(client, policy, seed=0, **kw)


def test_judging_survives_every_fault_kind_and_retries_failed_items(tmp_path, toy_data):
  items, paths = _judged_items(toy_data, tmp_path)
  with serve_in_thread() as server:
    clean = evaluation.judge_items(
        _judge(server), "toy", items, paths, str(tmp_path / "clean.jsonl")
    )
  digests = [judge_server.image_digest(Image.open(paths[it.id])) for it in items]
  questions = [(d, p) for d in digests for p in evaluation.PERSPECTIVES]
  # Each kind on the first ask of one question; two questions fail on every ask.
  transient = dict(zip(questions, judge_server.FAULT_KINDS))
  persistent = {questions[-1]: "truncated", questions[-5]: "bool_score"}

  def choose(request):
    question = (request.edited, request.perspective)
    if question in persistent:
      return persistent[question]
    return transient.get(question) if request.attempt == 1 else None

  results = str(tmp_path / "results.jsonl")
  # A timeout far above an answer's time even on a loaded machine: only the slow fault times out.
  faults = judge_server.Faults(choose=choose, slow_seconds=1.5, retry_after_seconds=0.001)
  with serve_in_thread(faults=faults) as server:
    judge = _judge(server, timeout=1.0)
    records = evaluation.judge_items(judge, "toy", items, paths, results, concurrency=4)
    assert all(server.counts[kind] >= 1 for kind in judge_server.FAULT_KINDS)
  assert judge.stats["retry_bad_body"] == 1 + 3 and judge.stats["gave_up"] == 1
  failed = {it.id for it in items[-2:]}
  for it in items:
    for p in evaluation.PERSPECTIVES:
      got = records[it.id][p]
      if (digests[items.index(it)], p) in persistent:
        assert records[it.id]["status"] == "failed"
        assert got["error"].startswith(
            "no answer after 3 attempt(s)" if p == "quality" else "no valid reply in 3 asks"
        ), got
      else:  # every transient fault absorbed: the clean run's answer, a float score
        assert (got["yes"], got["score"]) == (clean[it.id][p]["yes"], clean[it.id][p]["score"])
        assert type(got["score"]) is float
  assert {i for i, r in records.items() if r["status"] == "failed"} == failed
  assert evaluation.summarize(list(records.values()))["all"]["failed"] == 2

  # retry_failed judges the two again; results.jsonl keeps one line per id.
  with serve_in_thread() as server:
    again = evaluation.judge_items(_judge(server), "toy", items, paths, results, retry_failed=True)
    assert server.counts["requests"] == 2 * 3
  assert all(r["status"] == "ok" for r in again.values())
  ids = [json.loads(line)["id"] for line in open(results)]
  assert sorted(ids) == sorted(it.id for it in items)


def test_judging_stops_when_the_judge_dies_and_resumes(tmp_path, toy_data):
  items, paths = _judged_items(toy_data, tmp_path)
  alive = [10]

  def choose(request):
    alive[0] -= 1
    return "disconnect" if alive[0] < 0 else None

  results = str(tmp_path / "results.jsonl")
  with serve_in_thread(faults=judge_server.Faults(choose=choose)) as server:
    with pytest.raises(JudgeUnavailable, match="looks down"):
      evaluation.judge_items(
          _judge(server, evidence_grace=0.2), "toy", items, paths, results, concurrency=3
      )
  saved = [json.loads(line) for line in open(results)]
  assert len(saved) < len(items) and all(r["status"] == "ok" for r in saved)  # nobody blamed
  with serve_in_thread() as server:
    records = evaluation.judge_items(_judge(server), "toy", items, paths, results)
    assert server.counts["requests"] == 3 * (len(items) - len(saved))
  assert all(r["status"] == "ok" for r in records.values())
  assert sorted(json.loads(line)["id"] for line in open(results)) == sorted(it.id for it in items)
