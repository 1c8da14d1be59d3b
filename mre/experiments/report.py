"""Tables, the claim check and image grids of the toy replication."""

from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image

from mre.experiments.stats import PERSPECTIVES, failures, separated

CATEGORIES = ("local", "remove", "add", "background", "global")
MAIN_ROWS = ("stage 1", "(a) baseline", "(b) reward 5,5,5")
# --smartedit: the SmartEdit-style toy editor without and with the reward (the paper's second row)
SMARTEDIT_ROWS = ("SmartEdit (a) baseline", "SmartEdit (b) reward 5,5,5")
GOAL = {"following": 0.70, "preserving": 0.80, "quality": 0.80}  # competent editor at (5,5,5)


def _pct(v):
  return f"{100 * v:.1f}%"


def _cell(stats: dict, key: str) -> str:
  low, high = stats[f"{key}_ci"]
  if key == "yes_rate":
    return f"{_pct(stats[key])} [{100 * low:.1f}, {100 * high:.1f}]"
  return f"{stats[key]:.2f} [{low:.2f}, {high:.2f}]"


def main_table(rows: dict, names) -> str:
  head = ["row", "n"] + [f"{p} {k}" for p in PERSPECTIVES for k in ("yes-rate", "score")]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name in names:
    a = rows[name]["summary"]["all"]
    cells = [name, str(a["n"])] + [
        _cell(a[p], k) for p in PERSPECTIVES for k in ("yes_rate", "score")
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def category_table(rows: dict, names) -> str:
  """Yes-rates (following / preserving / quality) per category."""
  head = ["row"] + list(CATEGORIES)
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name in names:
    s = rows[name]["summary"]
    cells = [name] + [
        " / ".join(_pct(s[c][p]["yes_rate"]) for p in PERSPECTIVES) if c in s else "-"
        for c in CATEGORIES
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def failure_table(row: dict, top: int = 2) -> str:
  """The commonest failure texts of a row's "no" verdicts, per category and perspective."""
  found = failures(row["records"].values(), top)
  lines = ["| category | " + " | ".join(PERSPECTIVES) + " |", "|" + "---|" * 4]
  for c in CATEGORIES:
    cells = [
        "; ".join(f"{text} ({n})" for text, n in found.get(c, {}).get(p, [])) or "-"
        for p in PERSPECTIVES
    ]
    lines.append(f"| {c} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def claim(rows: dict, names=MAIN_ROWS[1:]) -> dict:
  """(b) at (5,5,5) against (a) (`names`: their rows): per perspective, whether its yes-rate
  interval lies above."""
  a, b = (rows[n]["summary"]["all"] for n in names)
  per = {
      p: {
          "yes_rate_separated": separated(b[p], a[p]),
          "score_separated": separated(b[p], a[p], "score"),
          "yes_rate_gain": b[p]["yes_rate"] - a[p]["yes_rate"],
      }
      for p in PERSPECTIVES
  }
  goal = {p: b[p]["yes_rate"] >= GOAL[p] for p in PERSPECTIVES}
  return {
      "holds": all(v["yes_rate_separated"] for v in per.values()),
      "perspectives": per,
      "competent_at_5_5_5": all(goal.values()),
      "goal": GOAL,
      "goal_met": goal,
  }


def control(rows: dict, base: str = "(b) reward 5,5,5", row: str = "(b) reward {}") -> dict:
  """For each lowered perspective: the drop in yes-rate of every perspective from `base` (at
  5,5,5) to the row `row.format(lowered scores)`, and whether the lowered one dropped most."""
  if base not in rows:
    return {}
  base = rows[base]["summary"]["all"]
  out = {}
  for i, p in enumerate(PERSPECTIVES):
    scores = ["5", "5", "5"]
    scores[i] = "1"
    name = row.format(",".join(scores))
    if name not in rows:
      continue
    low = rows[name]["summary"]["all"]
    drops = {q: base[q]["yes_rate"] - low[q]["yes_rate"] for q in PERSPECTIVES}
    out[p] = {"row": name, "drops": drops, "own_drop_largest": max(drops, key=drops.get) == p}
  return out


def grid(items, columns, n: int = 10, scale: int = 4) -> np.ndarray:
  """One scene per row (two of each category); columns: the original, then each column's edit."""
  picked, per_category = [], {}
  for it in items:
    if per_category.get(it.category, 0) < max(1, n // len(CATEGORIES)):
      per_category[it.category] = per_category.get(it.category, 0) + 1
      picked.append(it)
  rows = []
  for it in picked[:n]:
    cells = [it.original] + [
        np.asarray(Image.open(paths[it.id]).convert("RGB")) for paths in columns
    ]
    rows.append(np.concatenate(cells, axis=1))
  image = np.concatenate(rows, axis=0)
  return np.kron(image, np.ones((scale, scale, 1), np.uint8))


_CONTROL_ROW = re.compile(r"\(b\) reward [0-9.]+,[0-9.]+,[0-9.]+(, its text empty)?")
EMPTY_TEXT_ROW = "(b) reward {}, its text empty"  # a control row whose lowered text is empty


def texts_label(texts) -> str:
  """' saying "a; b"' for the failure texts a guided-away row names ('' for none)."""
  return f' saying "{"; ".join(texts)}"' if texts else ""


def texts_tag(texts) -> str:
  """The same as a folder-name part: '_the-image-is-blurry' ('' for none)."""
  return "".join("_" + re.sub(r"[^a-z0-9]+", "-", t.lower()).strip("-") for t in texts)


def _control_lines(checks: dict) -> list:
  """One markdown line per lowered perspective of a `control` check."""
  return [
      f"- {v['row']}: yes-rate drops "
      + ", ".join(f"{q} {_pct(d)}" for q, d in v["drops"].items())
      + (
          f" (its own perspective, {p}, drops most)"
          if v["own_drop_largest"]
          else f" (NOT its own perspective, {p}, most)"
      )
      for p, v in checks.items()
  ]


def build(rows: dict, items, workdir: str, *, timings: dict, settings: dict) -> dict:
  """The report: markdown, every row's numbers, the claim and control checks; writes the grids."""
  result = {
      "rows": {name: row["summary"] for name, row in rows.items()},
      "claim": claim(rows),
      "control": control(rows),
      # --ablations: the same check on the scores-only model (no failure text beside a score)
      "control_scores_only": control(rows, "(b) scores only", "(b) scores only, {}"),
      # --control_texts=empty: the lowered perspective's failure text is the empty text
      "control_text_empty": control(rows, row=EMPTY_TEXT_ROW),
      # --smartedit: the same claim for the SmartEdit-style editor
      "claim_smartedit": (
          claim(rows, SMARTEDIT_ROWS) if all(r in rows for r in SMARTEDIT_ROWS) else None
      ),
      "timings": timings,
      "settings": settings,
  }
  main = [r for r in MAIN_ROWS if r in rows]
  # Control rows are (b) at given scores ("(b) reward 1,5,5"); other (b) variants are ablations.
  controls = ["(b) reward 5,5,5"] + [
      r for r in rows if _CONTROL_ROW.fullmatch(r) and r != "(b) reward 5,5,5"
  ]
  smartedit = [r for r in SMARTEDIT_ROWS if r in rows]
  others = [r for r in rows if r not in main and r not in controls and r not in smartedit]
  c = result["claim"]
  gains = ", ".join(f"{p} {_pct(v['yes_rate_gain'])} points" for p, v in c["perspectives"].items())
  md = [
      "## Main rows (yes-rate and mean score, 95% bootstrap intervals over test items)",
      "",
      main_table(rows, main),
      f"Claim ((b) at 5,5,5 above (a) on every perspective, non-overlapping yes-rate "
      f"intervals): **{'holds' if c['holds'] else 'does not hold'}** ({gains}). "
      f"Competent at 5,5,5 (following >= 70%, preserving >= 80%, quality >= 80%): "
      f"{'yes' if c['competent_at_5_5_5'] else 'no'}.",
      "",
      "## Per category (yes-rate following / preserving / quality)",
      "",
      category_table(rows, main),
      '## Commonest failures of (b) at 5,5,5 (text of the "no" verdicts, count)',
      "",
      failure_table(rows["(b) reward 5,5,5"]) if "records" in rows["(b) reward 5,5,5"] else "",
      "## Control: (b) with lowered scores",
      "",
      main_table(rows, controls),
  ]
  md += _control_lines(result["control"])
  for key, title in (
      ("control_text_empty", "Control with the lowered perspective's text empty:"),
      ("control_scores_only", "Control of the scores-only model:"),
  ):
    if result[key]:
      md += ["", title] + _control_lines(result[key])
  if others:
    md += ["", "## Ablations and reward guidance", "", main_table(rows, main[-1:] + others)]
  if smartedit:
    md += ["", "## The SmartEdit-style editor", "", main_table(rows, smartedit)]
    md += [category_table(rows, smartedit)]
    cs = result["claim_smartedit"]
    if cs:
      gains = ", ".join(
          f"{p} {_pct(v['yes_rate_gain'])} points" for p, v in cs["perspectives"].items()
      )
      md += [f"Claim for SmartEdit: **{'holds' if cs['holds'] else 'does not hold'}** ({gains})."]
  md += ["", f"Timings (s): {timings}", f"Settings: {settings}", ""]
  result["markdown"] = "\n".join(md)
  Image.fromarray(grid(items, [rows[r]["paths"] for r in main])).save(
      os.path.join(workdir, "grid.png")
  )
  Image.fromarray(grid(items, [rows[r]["paths"] for r in controls])).save(
      os.path.join(workdir, "control_grid.png")
  )
  return result
