"""Prints how the toy judge scores each failure mode, as a Markdown table.

    python -m data_prep.toy.judge_report --samples 2000

Every row uses the same scenes and instructions; a row applies exactly one flaw (or none), so a
good judge shows a low score on the flaw's own perspective and ~5 on the other two.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from absl import app, flags

from data_prep.toy import flaws, instructions, judge, scenes


@dataclasses.dataclass(frozen=True)
class Row:
  perspective: str  # "none" for the perfect edits
  mode: str
  count: int
  mean_scores: tuple[float, float, float]  # following, preserving, quality
  yes_rates: tuple[float, float, float]


def sample(index: int, seed: int, size: int):
  """The scene and instruction of sample `index`: shared by all rows."""
  rng = np.random.default_rng([seed, index])
  scene = scenes.random_scene(rng, size=size)
  return scene, instructions.sample_edit(rng, scene)


def score_table(samples: int = 2000, size: int = 32, seed: int = 0) -> list[Row]:
  """Judge scores of the perfect edits and of each single failure mode over `samples` triples
  (a mode that cannot apply to a triple, e.g. moving another object when there is none, skips it).
  """
  cases = [("none", None)] + [(p, m) for p in flaws.PERSPECTIVES for m in flaws.MODES[p]]
  triples = [sample(i, seed, size) for i in range(samples)]
  rows = []
  for case_index, (perspective, mode) in enumerate(cases):
    forced = {p: (mode if p == perspective else None) for p in flaws.PERSPECTIVES}
    scores, yes = [], []
    for i, (scene, edit_sample) in enumerate(triples):
      rng = np.random.default_rng([seed, i, 1 + case_index])
      target = flaws.make_flawed_target(rng, scene, edit_sample, flaws.FlawMix(), forced=forced)
      if mode is not None and target.flaws[perspective] is None:
        continue
      verdicts = judge.judge(edit_sample.instruction, scenes.render(scene), target.image).verdicts
      scores.append([v.score for v in verdicts])
      yes.append([v.yes for v in verdicts])
    rows.append(
        Row(
            perspective,
            mode or "perfect edit",
            len(scores),
            tuple(np.mean(scores, 0).round(2).tolist()),
            tuple(np.mean(yes, 0).round(2).tolist()),
        )
    )
  return rows


def markdown(rows: list[Row]) -> str:
  lines = [
      "| flaw | perspective | samples | following | preserving | quality |",
      "| --- | --- | ---: | ---: | ---: | ---: |",
  ]
  for row in rows:
    cells = []
    for k, p in enumerate(judge.PERSPECTIVES):
      text = f"{row.mean_scores[k]:.2f}"
      cells.append(f"**{text}**" if p == row.perspective else text)
    lines.append(f"| {row.mode} | {row.perspective} | {row.count} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


FLAGS = flags.FLAGS
flags.DEFINE_integer("samples", 2000, "triples per row (each row judges the same triples)")
flags.DEFINE_integer("size", 32, "image size in pixels")
flags.DEFINE_integer("seed", 0, "seed of the scenes, instructions and flaws")


def main(argv):
  del argv
  rows = score_table(FLAGS.samples, FLAGS.size, FLAGS.seed)
  print(
      f"Mean toy-judge score (0-5) per perspective, {FLAGS.samples} triples at {FLAGS.size} px, "
      "one flaw per row (bold: the flaw's own perspective).\n"
  )
  print(markdown(rows))


if __name__ == "__main__":
  app.run(main)
