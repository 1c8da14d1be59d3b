"""The benchmark's table: rows of JAX and PyTorch figures, as text, Markdown and JSON."""

from __future__ import annotations

import json
import os

ROW_TITLES = {
    "unet_train": "U-Net train step (fwd+bwd+AdamW)",
    "trainer": "trainer step (mre.train_step)",
    "unet_forward": "guided U-Net call (3 branches)",
    "edit": "one edit",
    "edit_batch": "batch edit",
    "input_pipeline": "input pipeline (one batch)",
    "conv_forward": "3x3 conv, level 1: forward",
    "conv_input_grad": "3x3 conv, level 1: input grad",
    "conv_weight_grad": "3x3 conv, level 1: kernel grad",
}
COLUMNS = (
    "row",
    "batch",
    "JAX ms",
    "JAX img/s",
    "JAX TFLOP/s",
    "MFU",
    "compile s",
    "JAX mem GB",
    "PyTorch ms",
    "PyTorch img/s",
    "PyTorch mem GB",
    "JAX/PyTorch",
)


def make_row(name: str, batch: int, jax_r: dict, torch_r: dict, peak_tflops) -> dict:
  """One row; the ratio is JAX time / PyTorch time (< 1: JAX is faster). PyTorch's TFLOP/s use
  the FLOPs XLA counts for the same computation."""
  row = {"row": name, "title": ROW_TITLES.get(name, name), "batch": batch, "jax": jax_r}
  row["torch"] = torch_r
  flops = jax_r.get("flops") or 0.0
  if flops and peak_tflops:
    row["jax"]["mfu"] = jax_r["tflops"] / peak_tflops
  if "ms" in torch_r:
    if flops:
      torch_r["tflops"] = flops / torch_r["median_s"] / 1e12
      if peak_tflops:
        torch_r["mfu"] = torch_r["tflops"] / peak_tflops
    row["ratio"] = jax_r["ms"] / torch_r["ms"]
  return row


def skipped_row(name: str, batch: int, why: str) -> dict:
  return {
      "row": name,
      "title": ROW_TITLES.get(name, name),
      "batch": batch,
      "jax": {"skipped": why},
      "torch": {"skipped": why},
  }


def _fmt(v, digits=3):
  if v is None:
    return "-"
  if isinstance(v, str):
    return v
  if isinstance(v, int):
    return str(v)
  if v == 0:
    return "0"
  if abs(v) >= 100:
    return f"{v:.0f}"
  return f"{v:.{digits}g}"


def _cells(row: dict) -> list:
  j, t = row["jax"], row["torch"]
  title = row["title"]
  if "steps" in j:
    title += f", {j['steps']} steps"
  mfu = j.get("mfu")
  return [
      title,
      str(row["batch"]),
      _fmt(j.get("ms")) if "ms" in j else j.get("skipped", "-"),
      _fmt(j.get("items_per_s")),
      _fmt(j.get("tflops")),
      f"{mfu:.1%}" if mfu is not None else "-",
      _fmt(j.get("compile_s"), 2),
      _fmt(j.get("memory_gb")),
      _fmt(t.get("ms")) if "ms" in t else t.get("skipped", "-"),
      _fmt(t.get("items_per_s")),
      _fmt(t.get("memory_gb")),
      f"{row['ratio']:.2f}" if "ratio" in row else "-",
  ]


def header(result: dict) -> list:
  """Lines above the table: the preset, device, peak and what the PyTorch column ran on."""
  d, p = result["device"], result["preset"]
  lines = [
      f"preset {p['name']}: {p['resolution']} px, batch {p['batch']}, {p['dtype']}, "
      f"remat {list(p['remat']) or 'none'}, edit {p['edit_steps']} Euler-ancestral steps",
      f"JAX {result['versions']['jax']} on {d['kind']} ({d['platform']}"
      + (f", {d['cores']} cores: {d['cpu']}" if d["platform"] == "cpu" else "")
      + ")",
  ]
  peak = result.get("peak_tflops")
  lines.append(
      f"peak for MFU: {_fmt(peak)} TFLOP/s ({result.get('peak_source')})"
      + (
          f"; measured float32 matmul: {_fmt(result['matmul_tflops'])} TFLOP/s"
          if result.get("matmul_tflops")
          else ""
      )
  )
  tv = result.get("torch_info")
  lines.append(
      f"PyTorch: torch {tv['torch']}, diffusers {tv['diffusers']} on {tv['device']} "
      f"({tv['threads']} threads)"
      if tv
      else f"PyTorch: {result.get('torch_unavailable')}"
  )
  lines.append(
      f"median of {result['reps']} timed calls after {result['warmup']} warm-up (edits: "
      f"{result.get('edit_reps', result['reps'])} after 2), JAX and PyTorch in turns; "
      "JAX/PyTorch < 1: JAX is faster"
  )
  return lines


def _footnotes(result: dict) -> list:
  notes = []
  for row in result["rows"]:
    j, t = row["jax"], row["torch"]
    if "step_ms" in j:
      per = f"{row['title']}: {_fmt(j['step_ms'])} ms per step (JAX)"
      if "step_ms" in t:
        per += f", {_fmt(t['step_ms'])} ms (PyTorch: {t.get('how')})"
      notes.append(per)
  for row in result["rows"]:
    if row["torch"].get("note"):
      notes.append(f"{row['title']}, PyTorch: {row['torch']['note']}")
  rows = {r["row"]: r["jax"] for r in result["rows"]}
  if "ms" in rows.get("input_pipeline", {}) and "ms" in rows.get("trainer", {}):
    share = rows["input_pipeline"]["ms"] / rows["trainer"]["ms"]
    notes.append(
        f"input pipeline: {share:.0%} of the trainer step's time (prepared while the previous "
        "step runs; on a CPU it competes for the same cores)"
    )
  return notes


def text_table(result: dict) -> str:
  rows = [list(COLUMNS)] + [_cells(r) for r in result["rows"]]
  widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
  lines = header(result) + [""]
  for n, r in enumerate(rows):
    lines.append(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    )
    if n == 0:
      lines.append("  ".join("-" * w for w in widths))
  return "\n".join(lines + [""] + _footnotes(result))


def markdown_table(result: dict) -> str:
  lines = [f"### {result['preset']['name']}", ""] + [f"- {h}" for h in header(result)] + [""]
  lines.append("| " + " | ".join(COLUMNS) + " |")
  lines.append("|" + "---|" * len(COLUMNS))
  for r in result["rows"]:
    lines.append("| " + " | ".join(_cells(r)) + " |")
  notes = _footnotes(result)
  return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"


def write(results: list, out_dir: str) -> tuple:
  """bench.json (every figure) and bench.md (the tables) in out_dir."""
  os.makedirs(out_dir, exist_ok=True)
  json_path, md_path = os.path.join(out_dir, "bench.json"), os.path.join(out_dir, "bench.md")
  with open(json_path, "w") as f:
    json.dump(results, f, indent=1, default=str)
  with open(md_path, "w") as f:
    f.write("\n".join(markdown_table(r) for r in results))
  return json_path, md_path
