import json

import numpy as np
from PIL import Image

from data_prep.toy import instructions, judge, scenes
from mre import evaluation
from mre.experiments import toy_eval


def _items(tmp_path, count=3):
  items, paths = [], {}
  for i in range(count):
    rng = np.random.default_rng([21, i])
    scene = scenes.random_scene(rng, size=24)
    sample = instructions.sample_edit(rng, scene)
    original = scenes.render(scene)
    item = evaluation.BenchItem(f"t{i}", original, sample.instruction, sample.edit.category)
    path = str(tmp_path / f"t{i}.png")
    Image.fromarray(original).save(path)  # an edit that does nothing
    items.append(item)
    paths[item.id] = path
  return items, paths


def test_judgements_of_another_judge_version_are_judged_again(tmp_path, monkeypatch):
  items, paths = _items(tmp_path)
  results = str(tmp_path / "results.jsonl")
  stale = {  # a record from before the judge version was stored, with other verdicts
      "id": "t0",
      "category": items[0].category,
      "instruction": items[0].instruction,
      "status": "ok",
      **{p: {"yes": True, "score": 5.0, "failure": "x"} for p in judge.PERSPECTIVES},
  }
  current = toy_eval.judge_record(items[1], paths[items[1].id])
  with open(results, "w") as f:
    f.write(json.dumps(stale) + "\n" + json.dumps(current) + "\n")

  judged = []
  real = toy_eval.judge_record
  monkeypatch.setattr(
      toy_eval, "judge_record", lambda item, path: judged.append(item.id) or real(item, path)
  )
  records = toy_eval.judge_items(items, paths, results)
  assert judged == ["t0", "t2"]  # the stale one and the new one; t1 is current
  assert records["t0"]["judge_version"] == judge.JUDGE_VERSION
  assert not records["t0"]["following"]["yes"]  # an unchanged image follows no instruction
  assert evaluation.read_results(results)["t0"] == records["t0"]
  judged.clear()
  assert toy_eval.judge_items(items, paths, results) == records
  assert judged == []
