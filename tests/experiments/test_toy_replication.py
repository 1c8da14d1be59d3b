"""The whole replication at a few steps (stage 1 -> (a), (b) -> evaluation -> tables with
intervals), so the machinery cannot rot; and the statistics it reports, checked by hand."""

import json
import os

import numpy as np
import pytest

from mre.experiments import stats, toy_eval, toy_replication
from tests.test_train import TINY


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_items():
  rng = np.random.default_rng(0)
  small = (rng.random(40) < 0.6).astype(float)
  large = (rng.random(4000) < 0.6).astype(float)
  lo_s, hi_s = stats.bootstrap_ci(small)
  lo_l, hi_l = stats.bootstrap_ci(large)
  assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
  assert hi_l - lo_l < 0.25 * (hi_s - lo_s)  # ~10x the items: ~1/sqrt(10) the width
  assert 0.50 < lo_l < 0.60 < hi_l < 0.70
  assert stats.bootstrap_ci(np.ones(30)) == (1.0, 1.0)


def test_summary_and_separation():
  recs = [
      {
          "category": "local" if i % 2 else "add",
          "status": "ok",
          **{p: {"yes": i % 3 == 0, "score": float(i % 6)} for p in stats.PERSPECTIVES},
      }
      for i in range(60)
  ] + [{"category": "add", "status": "failed"}]
  s = stats.summarize_with_ci(recs)
  assert s["all"]["n"] == 60 and s["all"]["failed"] == 1 and s["local"]["n"] == 30
  assert s["all"]["following"]["yes_rate"] == pytest.approx(20 / 60)
  assert s["all"]["quality"]["score"] == pytest.approx(np.mean([i % 6 for i in range(60)]))
  high = {"yes_rate": 0.9, "yes_rate_ci": [0.85, 0.95]}
  low = {"yes_rate": 0.5, "yes_rate_ci": [0.4, 0.6]}
  assert stats.separated(high, low) and not stats.separated(low, high)
  assert not stats.separated({"yes_rate_ci": [0.55, 0.9]}, low)


def test_replication_runs_end_to_end_and_resumes(tmp_path, toy_data):
  # Stage 2 and the SmartEdit runs start from stage 1's export (the recipes set model.pretrained),
  # with the paper's reward form.
  overrides = {k: v for k, v in TINY.items() if k not in ("model.pretrained", "model.reward.form")}
  overrides.update(
      {
          "train.warmup_steps": 1,
          "train.grad_accum": 1,
          "train.validate_every": 3,
      }
  )
  workdir = str(tmp_path / "replication")
  run = lambda **kw: toy_replication.replicate(  # noqa: E731
      workdir, seed=3, stage1_steps=4, stage2_steps=2, data_dir=toy_data, overrides=overrides, **kw
  )
  # A second seed's check: the main rows only; the full command then adds the control rows to it.
  main_only = run(control=False)
  assert list(main_only["rows"]) == ["stage 1", "(a) baseline", "(b) reward 5,5,5"]
  assert main_only["control"] == {} and not os.path.exists(
      os.path.join(workdir, "eval", "reward_1-1-1")
  )
  result = run()
  rows = result["rows"]
  for name, row in main_only["rows"].items():  # cached edits and judgements: the same numbers
    assert json.loads(json.dumps(rows[name])) == json.loads(json.dumps(row))
  names = [
      "stage 1",
      "(a) baseline",
      "(b) reward 5,5,5",
      "(b) reward 1,5,5",
      "(b) reward 5,1,5",
      "(b) reward 5,5,1",
      "(b) reward 1,1,1",
  ]
  assert list(rows) == names
  n = result["settings"]["eval_items"]
  assert n == 20  # the tiny test split: 4 scenes x 5 categories
  for name in names:
    a = rows[name]["all"]
    assert a["n"] == n and a["failed"] == 0
    for p in stats.PERSPECTIVES:
      lo, hi = a[p]["yes_rate_ci"]
      assert 0.0 <= lo <= a[p]["yes_rate"] <= hi <= 1.0
      lo, hi = a[p]["score_ci"]
      assert 0.0 <= lo <= a[p]["score"] <= hi <= 5.0
    assert {"local", "remove", "add", "background", "global"} <= set(rows[name])
  # The table is the judged results, recomputed here from the stored judgements.
  with open(os.path.join(workdir, "eval", "baseline", "results.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert len(records) == n
  yes = np.mean([r["following"]["yes"] for r in records])
  assert rows["(a) baseline"]["all"]["following"]["yes_rate"] == pytest.approx(yes)
  saved = json.load(open(os.path.join(workdir, "replication.json")))
  assert saved["rows"]["(b) reward 5,5,5"] == json.loads(json.dumps(rows["(b) reward 5,5,5"]))
  assert set(saved["claim"]["perspectives"]) == set(stats.PERSPECTIVES)
  assert isinstance(saved["claim"]["holds"], bool)
  for image in ("grid.png", "control_grid.png"):
    assert os.path.getsize(os.path.join(workdir, image)) > 0
  assert "| (b) reward 5,5,5 |" in open(os.path.join(workdir, "replication.md")).read()
  # Stage 2 started from stage 1's export: (a) and (b) hold the stage-1 weights' descendants.
  summary = json.load(open(os.path.join(workdir, "reward", "train_summary.json")))
  assert summary["step"] == 2 and summary["validation"]
  # A rerun trains nothing and re-edits nothing: everything is resumed from disk.
  cached = os.path.join(workdir, "eval", "reward_5-5-5", "images")
  stamps = {f: os.path.getmtime(os.path.join(cached, f)) for f in os.listdir(cached)}
  export = os.path.join(workdir, "reward", "export", "mre_model.json")
  export_stamp = os.path.getmtime(export)
  again = run()
  assert again["rows"] == json.loads(json.dumps(rows))
  assert {f: os.path.getmtime(os.path.join(cached, f)) for f in os.listdir(cached)} == stamps
  assert os.path.getmtime(export) == export_stamp
  # Other edit settings: the same trained runs, their own edits and reports in eval_<tag>/.
  report = open(os.path.join(workdir, "replication.md")).read()
  settings = toy_eval.eval_settings(sampler="euler_ancestral", text_scale=3.0)
  other = run(
      control=False,
      eval_items=5,
      settings=settings,
      negative_guidance=(1.0,),
      negative_texts=(None, None, "the image is blurry"),
  )
  tagged = os.path.join(workdir, "eval_euler_ancestral-20-sT3-sI1")
  assert other["report_dir"] == tagged and other["settings"]["eval"] == settings
  assert other["rows"]["(a) baseline"]["all"]["n"] == 5
  # Guidance away from a low reward (its quality text named): one more row of (b), its own edits.
  row = '(b) reward 5,5,5, away from 1,1,1 saying "the image is blurry" at 1'
  assert other["rows"][row]["all"]["n"] == 5
  away = os.path.join(tagged, "eval", "reward_away_1-1-1_the-image-is-blurry_1", "images")
  assert len(os.listdir(away)) == 5
  assert len(os.listdir(os.path.join(tagged, "eval", "reward_5-5-5", "images"))) == 5
  assert json.load(open(os.path.join(tagged, "replication.json")))["settings"]["eval"] == settings
  assert open(os.path.join(workdir, "replication.md")).read() == report
  assert os.path.getmtime(export) == export_stamp
  # The SmartEdit-style editor from stage 1's U-Net, without and with the reward: two more runs and
  # rows, and the claim checked for them too (a learning rate at which the LLM learns its
  # constant answer in a few steps, so the editor can edit).
  se = run(
      control=False,
      eval_items=5,
      smartedit=True,
      smartedit_steps=12,
      smartedit_overrides={
          "train.lr": 1e-2,
          "train.lr_schedule": "constant",
          # the alignment stage, then 8 SmartEdit steps (their fresh optimizer state learns
          # the LLM's answer again in as many steps as from scratch)
          "model.smartedit.align_steps": 4,
      },
  )
  assert se["rows"]["SmartEdit (b) reward 5,5,5"]["all"]["n"] == 5
  assert se["rows"]["SmartEdit (a) baseline"]["all"]["n"] == 5
  assert set(se["claim_smartedit"]["perspectives"]) == set(stats.PERSPECTIVES)
  assert "## The SmartEdit-style editor" in se["markdown"]
  assert se["settings"]["smartedit_steps"] == 12
  for name in ("smartedit_baseline", "smartedit_reward"):
    assert json.load(open(os.path.join(workdir, name, "train_summary.json")))["step"] == 12


def test_control_finds_the_perspective_each_lowered_score_moves_most():
  from mre.experiments import report

  def row(f, p, q):
    return {"summary": {"all": {k: {"yes_rate": v} for k, v in zip(stats.PERSPECTIVES, (f, p, q))}}}

  rows = {
      "(b) scores only": row(0.8, 0.8, 0.8),
      "(b) scores only, 1,5,5": row(0.5, 0.7, 0.7),  # following drops most
      "(b) scores only, 5,1,5": row(0.6, 0.7, 0.7),  # following again: not its own
  }
  out = report.control(rows, "(b) scores only", "(b) scores only, {}")
  assert set(out) == {"following", "preserving"}
  assert out["following"]["own_drop_largest"] and not out["preserving"]["own_drop_largest"]
  assert out["following"]["drops"]["following"] == pytest.approx(0.3)
  assert report.control(rows) == {}  # no (b) reward rows


def test_failure_table_counts_the_commonest_no_verdicts_per_category():
  from mre.experiments import report

  def rec(category, quality_yes, text):
    ok = {"yes": True, "failure": "no negative aspects"}
    return {
        "category": category,
        "status": "ok",
        "following": ok,
        "preserving": ok,
        "quality": {"yes": quality_yes, "failure": text},
    }

  records = [rec("local", False, "the image is blurry")] * 3 + [
      rec("local", False, "colour banding"),
      rec("local", True, "no noticeable issues"),
      rec("add", False, "blocky artifacts"),
  ]
  table = report.failure_table({"records": dict(enumerate(records))})
  assert "| local | - | - | the image is blurry (3); colour banding (1) |" in table
  assert "| add | - | - | blocky artifacts (1) |" in table
  assert "| global | - | - | - |" in table
