"""Benchmark evaluation with a judge: edit every item, ask the three questions, summarise.

The flow of the paper's Real-Edit evaluation (docs/recipes.md, "Real-Edit judging flow"): each
edited image is judged from three perspectives, one request each (following and preserving from
(instruction, original, edited), quality from the edited image alone), answering yes/no and a 0-5
score. Reported per perspective: the yes-rate and the mean score, overall and per category.

Everything is resumable: edited images are cached as PNG (re-judging never re-edits), and judged
items are appended to `results.jsonl` one line each (a rerun skips finished ids). A question the
judge cannot answer (malformed replies after the re-asks, a request that kept failing while the
judge answered others) fails its item, recorded with the reason per perspective, and the run goes
on; `retry_failed` judges failed items again, and the file is then compacted to one line per id.
A judge that looks down (mre.judging.client) stops the run with JudgeUnavailable.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import html
import json
import os
import re
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from mre import jsonl
from mre.judging import prompts
from mre.judging.client import JudgeClient, run_concurrently

PERSPECTIVES = prompts.PERSPECTIVES  # following, preserving, quality


@dataclasses.dataclass(frozen=True)
class BenchItem:
  id: str
  original: np.ndarray  # uint8 [H, W, 3]
  instruction: str
  category: str


def _str(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def load_benchmark(
    name: str, data_dir: str, split: str = "test", limit: Optional[int] = None
) -> list[BenchItem]:
  """Items of a prepared TFDS benchmark split (`real_edit`, `toy_edit/24px`, ...)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(
        f"benchmark {name} (split {split}) is not prepared in {data_dir}: " f"{e}"
    ) from e
  n = len(source) if limit is None else min(limit, len(source))
  items = []
  for i in range(n):
    r = source[i]
    items.append(
        BenchItem(
            _str(r.get("id", i)),
            np.asarray(r["original"], np.uint8),
            _str(r["instruction"]),
            _str(r.get("category", "all")),
        )
    )
  return items


def safe_name(item_id: str) -> str:
  return re.sub(r"[^A-Za-z0-9._-]", "_", item_id)


def edit_items(
    editor, items: Sequence[BenchItem], images_dir: str, *, batch_size=16, reward=None
) -> dict:
  """Edits the items not yet cached in `images_dir`; returns {id: path} for all items."""
  os.makedirs(images_dir, exist_ok=True)
  paths = {it.id: os.path.join(images_dir, safe_name(it.id) + ".png") for it in items}
  todo = [it for it in items if not os.path.exists(paths[it.id])]
  if todo:
    with tqdm(total=len(todo), desc="editing", unit="img") as bar:
      for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        edited = editor.edit(
            [Image.fromarray(it.original) for it in chunk],
            [it.instruction for it in chunk],
            batch_size=batch_size,
            reward=None if reward is None else reward(len(chunk)),
        )
        for it, img in zip(chunk, edited):
          tmp = paths[it.id] + ".tmp.png"
          img.save(tmp)
          os.replace(tmp, paths[it.id])  # a kill never leaves a half-written cached image
        bar.update(len(chunk))
  return paths


def read_results(path: str) -> dict:
  """{id: record} of a results JSONL. A torn last line (killed mid-write) is cut off, and a file
  with several lines of an id (a run killed before compacting it) is compacted to the latest."""
  found, intact = jsonl.read_records(path, "a results record")
  jsonl.cut_torn_tail(path, intact)  # so that appends start on a fresh line
  records = {rec["id"]: rec for rec in found}
  if len(records) < len(found):
    _write_results(path, records)
  return records


def _write_results(path: str, records: dict):
  jsonl.write_atomically(path, "".join(json.dumps(r) + "\n" for r in records.values()))


def judge_item(judge: JudgeClient, model: str, item: BenchItem, edited_path: str) -> dict:
  edited = np.asarray(Image.open(edited_path).convert("RGB"))
  record = {
      "id": item.id,
      "category": item.category,
      "instruction": item.instruction,
      "status": "ok",
      "usage": {"prompt_tokens": 0, "completion_tokens": 0},
  }
  for p in PERSPECTIVES:
    body = prompts.chat_request(model, "evaluation", p, item.instruction, item.original, edited)
    reply = judge.ask(body, functools.partial(prompts.parse_evaluation_reply, p))
    for k, v in reply.usage.as_dict().items():
      record["usage"][k] += v
    if reply.ok:
      record[p] = {"yes": reply.value.yes, "score": reply.value.score, "raw": reply.texts[-1]}
    else:
      record[p] = {"error": reply.error}
      record["status"] = "failed"
  return record


def judge_items(
    judge: JudgeClient,
    model: str,
    items: Sequence[BenchItem],
    paths: dict,
    results_path: str,
    *,
    concurrency: int = 8,
    retry_failed: bool = False,
) -> dict:
  """Judges the items without a result yet (and the failed ones with `retry_failed`), appending
  each to `results_path`; returns all. If the judge looks down, the judged items are saved and
  JudgeUnavailable raised."""
  done = read_results(results_path)
  todo = [
      it
      for it in items
      if it.id not in done or (retry_failed and done[it.id]["status"] == "failed")
  ]
  rejudged = sum(1 for it in todo if it.id in done)
  if todo:
    try:
      with (
          open(results_path, "a") as out,
          tqdm(total=len(todo), desc="judging", unit="item") as bar,
      ):
        jobs = run_concurrently(
            lambda it: judge_item(judge, model, it, paths[it.id]), todo, concurrency
        )
        try:
          for item, future in jobs:
            rec = future.result()
            out.write(json.dumps(rec) + "\n")
            out.flush()
            os.fsync(out.fileno())
            done[item.id] = rec
            bar.update(1)
        except BaseException:
          judge.stop()  # cut the other workers' retries short
          raise
        finally:
          jobs.close()
    finally:
      if rejudged:  # one line per id: the latest judgement
        _write_results(results_path, done)
  return {it.id: done[it.id] for it in items}


def summarize(records: Sequence[dict]) -> dict:
  """{"all": stats, "<category>": stats}; stats: n, failed, and per perspective yes-rate, score."""
  groups = {"all": list(records)}
  for r in records:
    groups.setdefault(r["category"], []).append(r)
  out = {}
  for name, recs in groups.items():
    ok = [r for r in recs if r["status"] == "ok"]
    stats = {"n": len(ok), "failed": len(recs) - len(ok)}
    for p in PERSPECTIVES:
      stats[p] = {
          "yes_rate": float(np.mean([r[p]["yes"] for r in ok])) if ok else float("nan"),
          "score": float(np.mean([r[p]["score"] for r in ok])) if ok else float("nan"),
      }
    out[name] = stats
  return out


def summary_rows(summary: dict):
  for name, s in summary.items():
    yield [name, s["n"], s["failed"]] + [
        v for p in PERSPECTIVES for v in (s[p]["yes_rate"], s[p]["score"])
    ]


HEADER = ["category", "n", "failed"] + [
    f"{p} {k}" for p in PERSPECTIVES for k in ("yes-rate", "score")
]


def summary_markdown(summary: dict, title: str = "") -> str:
  lines = ([f"### {title}", ""] if title else []) + [
      "| " + " | ".join(HEADER) + " |",
      "|" + "---|" * len(HEADER),
  ]
  for row in summary_rows(summary):
    cells = [str(row[0]), str(row[1]), str(row[2])]
    cells += [f"{v:.1%}" if i % 2 == 0 else f"{v:.2f}" for i, v in enumerate(row[3:])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_reports(
    summary: dict,
    records: dict,
    items: Sequence[BenchItem],
    paths: dict,
    out_dir: str,
    title: str = "",
):
  with open(os.path.join(out_dir, "summary.md"), "w") as f:
    f.write(summary_markdown(summary, title))
  with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(HEADER)
    w.writerows(summary_rows(summary))
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  write_gallery(records, items, paths, out_dir)


def write_gallery(records: dict, items: Sequence[BenchItem], paths: dict, out_dir: str):
  """gallery.html: original | edited | the judge's answers, one row per item."""
  orig_dir = os.path.join(out_dir, "originals")
  os.makedirs(orig_dir, exist_ok=True)
  rows = []
  for it in items:
    orig = os.path.join(orig_dir, safe_name(it.id) + ".png")
    if not os.path.exists(orig):
      Image.fromarray(it.original).save(orig)
    rec = records[it.id]
    verdicts = "<br>".join(
        f"{p}: "
        + (
            f"{'yes' if rec[p]['yes'] else 'no'}, {rec[p]['score']:.1f}"
            if "yes" in rec[p]
            else f"failed ({html.escape(rec[p]['error'][:80])})"
        )
        for p in PERSPECTIVES
    )
    rel = lambda p: html.escape(os.path.relpath(p, out_dir))
    rows.append(
        f"<tr><td>{html.escape(it.id)}<br><i>{html.escape(it.category)}</i></td>"
        f"<td>{html.escape(it.instruction)}</td><td><img src='{rel(orig)}'></td>"
        f"<td><img src='{rel(paths[it.id])}'></td><td>{verdicts}</td></tr>"
    )
  page = (
      "<!doctype html><meta charset='utf-8'><title>mre evaluation</title><style>img{width:160px;"
      "image-rendering:pixelated}td{padding:4px;vertical-align:top;font:13px sans-serif}</style>"
      "<table><tr><th>id</th><th>instruction</th><th>original</th><th>edited</th>"
      "<th>judge</th></tr>" + "".join(rows) + "</table>"
  )
  with open(os.path.join(out_dir, "gallery.html"), "w") as f:
    f.write(page)


def check_provenance(out_dir: str, provenance: dict):
  """Cached edits and judgements are only reused for the same model, settings and judge."""
  path = os.path.join(out_dir, "provenance.json")
  provenance = json.loads(json.dumps(provenance, default=str))
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != provenance:
      raise ValueError(
          f"{out_dir} holds edits and judgements made with {old}, not {provenance}; "
          "choose another output folder (or delete this one)"
      )
  else:
    with open(path, "w") as f:
      json.dump(provenance, f, indent=1)


def evaluate(
    editor,
    items: Sequence[BenchItem],
    judge: JudgeClient,
    judge_model: str,
    out_dir: str,
    *,
    reward_scores=None,
    concurrency: int = 8,
    batch_size: int = 16,
    title: str = "",
    model_id: str = "",
    retry_failed: bool = False,
) -> dict:
  """Edits (cached), judges (resumable), and writes summary.{md,csv,json} + gallery.html.

  `model_id` names the model (e.g. its folder) in `provenance.json`, which guards the caches.
  """
  os.makedirs(out_dir, exist_ok=True)
  check_provenance(
      out_dir,
      {
          "model": model_id,
          "settings": dataclasses.asdict(editor.settings),
          "reward": reward_scores,
          "judge_model": judge_model,
      },
  )
  reward = None
  if reward_scores is not None and editor.is_reward:
    reward = lambda n: editor.reward_inputs(n, scores=tuple(reward_scores))
  paths = edit_items(
      editor, items, os.path.join(out_dir, "images"), batch_size=batch_size, reward=reward
  )
  records = judge_items(
      judge,
      judge_model,
      items,
      paths,
      os.path.join(out_dir, "results.jsonl"),
      concurrency=concurrency,
      retry_failed=retry_failed,
  )
  summary = summarize(list(records.values()))
  write_reports(summary, records, items, paths, out_dir, title)
  return summary
