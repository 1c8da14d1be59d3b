"""Validation during training: a fixed set edited at several reward settings, as one image grid,
and, for datasets that come with a judge (the toy world), judged edits as numbers. Both trainers
(mre/train.py, mre/smartedit_train.py) build them from the config (`validation_grid`,
`validation_judge`) and run them with `validate`.

Grid rows are validation items; columns are the original, the edit at each reward setting (one
column for a stage-1 model), and the reference edit when the dataset has one.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from absl import logging
from flax import nnx
from PIL import Image
from tqdm import tqdm

from mre.editor import EditSettings, Editor, to_uint8
from mre.smartedit_editor import SmartEditor, SmartEditPipeline


def _editor(pipe, settings: EditSettings):
  """A `SmartEditor` for a SmartEdit pipeline (`settings` then `SmartEditSettings`), else an
  `Editor`."""
  return (
      SmartEditor(pipe, settings) if isinstance(pipe, SmartEditPipeline) else Editor(pipe, settings)
  )


def _load(pipe, params: dict):
  """Puts `params` into the editor's networks: {"unet": ..., ["text_encoder": ...]} for an
  InstructPix2Pix pipeline, {"model": the trained part of the SmartEdit} for a SmartEdit one."""
  if "model" in params:
    nnx.update(pipe.model, params["model"])
    return
  nnx.update(pipe.unet, params["unet"])
  if "text_encoder" in params:
    nnx.update(pipe.text_encoder, params["text_encoder"])


class ValidationGrid:

  def __init__(
      self,
      pipe,
      originals: np.ndarray,
      instructions: Sequence[str],
      references: Optional[np.ndarray],
      rewards,
      settings: EditSettings,
  ):
    """originals/references: float images [N, H, W, 3] in [-1, 1] at a valid model size."""
    self.editor = _editor(pipe, settings)
    self.originals, self.instructions, self.references = originals, list(instructions), references
    self.rewards = [tuple(r) for r in rewards] if self.editor.is_reward else [None]

  def render(self, params: dict) -> np.ndarray:
    """Edits with `params` (`_load`'s), returns the grid (uint8 HxWx3)."""
    _load(self.editor.pipe, params)
    columns = [to_uint8(self.originals)]
    n = len(self.instructions)
    for scores in self.rewards:
      reward = None if scores is None else self.editor.reward_inputs(n, scores=scores)
      edited = self.editor.edit_arrays(self.originals, self.instructions, reward=reward)
      columns.append(to_uint8(edited))
    if self.references is not None:
      columns.append(to_uint8(self.references))
    rows = [np.concatenate([c[i] for c in columns], axis=1) for i in range(n)]
    return np.concatenate(rows, axis=0)

  def header(self) -> str:
    cols = ["original"] + (
        ["edit"]
        if self.rewards == [None]
        else [f"reward {','.join(f'{v:g}' for v in r)}" for r in self.rewards]
    )
    return " | ".join(cols + (["reference"] if self.references is not None else []))


PERSPECTIVES = ("following", "preserving", "quality")


class ValidationJudge:
  """Edits a fixed set of validation items and judges them in process.

  `judge(instruction, original_uint8, edited_uint8)` returns an object with `.verdicts`, three
  (following, preserving, quality) verdicts that have `.yes` and `.score` (the toy judge does).
  A reward model is edited at `reward` (perfect by default), as at evaluation.
  """

  def __init__(
      self,
      pipe,
      originals: np.ndarray,
      instructions: Sequence[str],
      judge,
      settings: EditSettings,
      reward=(5.0, 5.0, 5.0),
      batch_size: int = 64,
  ):
    self.editor = _editor(pipe, settings)
    self.originals, self.instructions = originals, list(instructions)
    self.judge, self.reward, self.batch_size = judge, tuple(reward), batch_size

  def metrics(self, params: dict) -> dict:
    """{"<perspective>_yes": yes-rate, "<perspective>_score": mean score} of `params` (`_load`'s)."""
    _load(self.editor.pipe, params)
    originals_u8 = to_uint8(self.originals)
    yes, score = [], []
    for start in range(0, len(self.instructions), self.batch_size):
      chunk = slice(start, start + self.batch_size)
      texts = self.instructions[chunk]
      reward = (
          self.editor.reward_inputs(len(texts), scores=self.reward)
          if self.editor.is_reward
          else None
      )
      edited = to_uint8(self.editor.edit_arrays(self.originals[chunk], texts, reward=reward))
      for text, original, image in zip(texts, originals_u8[chunk], edited):
        verdicts = self.judge(text, original, image).verdicts
        yes.append([float(v.yes) for v in verdicts])
        score.append([float(v.score) for v in verdicts])
    yes, score = np.mean(yes, axis=0), np.mean(score, axis=0)
    out = {}
    for i, p in enumerate(PERSPECTIVES):
      out[f"{p}_yes"], out[f"{p}_score"] = float(yes[i]), float(score[i])
    return out


def save_grid(grid: np.ndarray, path: str, scale: int = 4):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img = Image.fromarray(grid)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  img.save(path)
  return path


def validation_settings(config) -> EditSettings:
  """How validation edits are made (grid and judged edits alike)."""
  t = config.train
  return EditSettings(
      steps=t.val_steps,
      sampler=t.val_sampler,
      text_scale=t.val_text_scale,
      image_scale=t.val_image_scale,
      seed=config.seed,
      resolution=config.data.resolution,
  )


def validation_grid(config, pipe, source, settings=None):
  """The validation grid; `settings` (default `validation_settings`) as the editor takes them."""
  t = config.train
  originals, instructions, references = source.validation_items(t.val_count, config.data.resolution)
  settings = settings or validation_settings(config)
  return ValidationGrid(pipe, originals, instructions, references, t.val_rewards, settings)


def validation_judge(config, pipe, source, settings=None):
  """Judged validation edits, for datasets with a judge (the toy world) and `val_judge_items`."""
  t = config.train
  if not (t.val_judge_items and source.judge is not None):
    return None
  originals, instructions, _ = source.validation_items(t.val_judge_items, config.data.resolution)
  settings = settings or validation_settings(config)
  return ValidationJudge(pipe, originals, instructions, source.judge, settings)


def validate(grid, judged, params, step, workdir, writer) -> dict:
  """Renders the grid with `params` (host copies, `ValidationGrid.render`'s) and, with a judge,
  measures the yes-rates; returns the metrics record."""
  image = grid.render(params)
  path = save_grid(image, os.path.join(workdir, "validation", f"step_{step:06d}.png"))
  if writer:
    writer.add_image("validation/" + grid.header(), image, step, dataformats="HWC")
  logging.info("validation grid (%s) -> %s", grid.header(), path)
  record = {"step": step, "validation": {}}
  if judged is not None:
    metrics = judged.metrics(params)
    record["validation"] = metrics
    if writer:
      for k, v in metrics.items():
        writer.add_scalar(f"val/{k}", v, step)
    line = " ".join(
        f"{p} {metrics[p + '_yes']:.0%} ({metrics[p + '_score']:.2f})"
        for p in ("following", "preserving", "quality")
    )
    tqdm.write(
        f"step {step} validation, {len(judged.instructions)} judged edits"
        f"{' at reward ' + ','.join(f'{v:g}' for v in judged.reward) if judged.editor.is_reward else ''}"
        f": yes-rate (mean score) {line}"
    )
    logging.info("step %d validation: %s", step, metrics)
  return record
