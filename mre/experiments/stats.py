"""Yes-rates and mean scores with bootstrap confidence intervals over test items.

A row of the replication table is one model (at one reward) judged on the same test items as the
others. Its uncertainty comes from which items the test set happens to hold, so intervals are
percentile bootstraps over items: resample the items with replacement, recompute the yes-rate and
the mean score, and take the 2.5th and 97.5th percentiles of the resampled values.
"""

from __future__ import annotations

import collections

from typing import Sequence

import numpy as np

PERSPECTIVES = ("following", "preserving", "quality")


def bootstrap_ci(
    values: np.ndarray, *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean of `values` (one value per item)."""
  values = np.asarray(values, np.float64)
  if values.size == 0:
    return (float("nan"), float("nan"))
  rng = np.random.default_rng(seed)
  picks = rng.integers(0, values.size, size=(resamples, values.size))
  means = values[picks].mean(axis=1)
  tail = (1.0 - level) / 2.0
  low, high = np.quantile(means, [tail, 1.0 - tail])
  return (float(low), float(high))


def perspective_stats(records: Sequence[dict], perspective: str, **bootstrap) -> dict:
  """{yes_rate, yes_rate_ci, score, score_ci} of one perspective over judged records."""
  yes = np.array([float(r[perspective]["yes"]) for r in records])
  score = np.array([float(r[perspective]["score"]) for r in records])
  if not len(records):
    nan = float("nan")
    return {"yes_rate": nan, "yes_rate_ci": [nan, nan], "score": nan, "score_ci": [nan, nan]}
  return {
      "yes_rate": float(yes.mean()),
      "yes_rate_ci": list(bootstrap_ci(yes, **bootstrap)),
      "score": float(score.mean()),
      "score_ci": list(bootstrap_ci(score, **bootstrap)),
  }


def summarize_with_ci(records: Sequence[dict], **bootstrap) -> dict:
  """{"all": {n, <perspective>: stats}, "<category>": {...}} for judged records
  ({"category", "following": {"yes", "score"}, ...}); failed records are left out and counted."""
  ok = [r for r in records if r.get("status", "ok") == "ok"]
  groups = {"all": ok}
  for r in ok:
    groups.setdefault(r["category"], []).append(r)
  out = {}
  for name, recs in groups.items():
    out[name] = {
        "n": len(recs),
        **{p: perspective_stats(recs, p, **bootstrap) for p in PERSPECTIVES},
    }
  out["all"]["failed"] = len(records) - len(ok)
  return out


def separated(better: dict, worse: dict, key: str = "yes_rate") -> bool:
  """True when `better`'s interval lies wholly above `worse`'s (non-overlapping, better higher)."""
  return better[f"{key}_ci"][0] > worse[f"{key}_ci"][1]


def failures(records, top: int = 3) -> dict:
  """{category: {perspective: [(failure text, count), ...]}} of the "no" verdicts."""
  counts = collections.defaultdict(lambda: collections.defaultdict(collections.Counter))
  for r in records:
    for p in PERSPECTIVES:
      if r.get("status", "ok") == "ok" and not r[p]["yes"]:
        counts[r["category"]][p][r[p]["failure"]] += 1
  return {c: {p: v.most_common(top) for p, v in ps.items()} for c, ps in counts.items()}
