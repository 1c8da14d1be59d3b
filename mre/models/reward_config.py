"""What a reward is, apart from the networks that read it: `RewardConfig` and its values.

A reward is three perspectives (instruction following, detail preserving, generation quality),
each a score in [0, 5] and a failure text. `RewardConfig` is the one object that knows, for its
form, how many text slots the model sees and how the three texts fill them (the released form
joins them into one), what the perfect reward says, and what the null reward is (the "no reward"
of reward dropout and of reward guidance's unconditional branch). The trainer, the data pipeline,
the editor and the judge prompts all take these from here.

This module imports no JAX at load time: the judge prompts and grain's worker processes use it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

FORMS = ("paper", "released")
PERFECT_SCORES = (5.0, 5.0, 5.0)
# What the texts say at inference: the paper's figure, and the release's "None". The judge asks
# for the paper's texts, lower-cased, when nothing is wrong (mre/judging/prompts.py NOTHING_WRONG);
# CLIP's tokenizer lower-cases, so the model sees the same tokens either way.
PAPER_PERFECT_TEXTS = ("No negative aspects", "No unintended changes", "No noticeable issues")
RELEASED_PERFECT_TEXTS = ("None", "None", "None")
NULL_SCORE = -1.0  # the "no reward" condition of reward dropout; outside the [0, 5] score range
NULL_TEXT = ""  # the null reward's text in every slot: the empty prompt
TEXT_SEPARATOR = "; "  # the released form encodes the three failure texts as one prompt


class RewardInputs(NamedTuple):
  scores: "jax.Array"  # [B, 3] float
  text: "jax.Array"  # [B, 3, D] (paper) or [B, 1, D] (released) pooled CLIP features


def join_texts(texts: Sequence[str]) -> str:
  """The released form's one prompt for the three failure texts."""
  return TEXT_SEPARATOR.join(texts)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  form: str = "paper"  # "paper" (zero-initialised MRC module) or "released"
  use_scores: bool = True  # ablation: drop the score half of the reward
  use_texts: bool = True  # ablation: drop the failure-text half
  inject_latent: bool = True  # the reward encoder after conv_in
  inject_unet: bool = True  # the projection added to the time embedding
  score_dim: int = 256  # sinusoid width per score (256 in the release)
  heads: int = 8  # reward cross-attention heads (8 x 40 at SD scale)
  attn_dropout: float = 0.1  # released form's BERT-style dropout, training only
  dropout_prob: float = 0.0  # reward dropout during training (0 as in the paper)
  text_dropout_prob: float = 0.0  # ours: per text, the empty text in training (scores kept)

  def __post_init__(self):
    if self.form not in FORMS:
      raise ValueError(f"reward form {self.form!r} is not 'paper' or 'released'")
    if not (self.use_scores or self.use_texts):
      raise ValueError("a reward needs scores, texts, or both (use_scores/use_texts both False)")
    if not (self.inject_latent or self.inject_unet):
      raise ValueError("a reward must be injected somewhere (inject_latent/inject_unet both False)")
    if not 0.0 <= self.dropout_prob < 1.0:
      raise ValueError(f"reward dropout_prob {self.dropout_prob} is not in [0, 1)")
    if not 0.0 <= self.text_dropout_prob < 1.0:
      raise ValueError(f"reward text_dropout_prob {self.text_dropout_prob} is not in [0, 1)")

  @property
  def text_slots(self) -> int:
    """Text features per sample: one per perspective (paper), or one joined text (released)."""
    return 3 if self.form == "paper" else 1

  @property
  def perfect_texts(self) -> tuple:
    """The three failure texts of a perfect reward (the inference condition by default)."""
    return PAPER_PERFECT_TEXTS if self.form == "paper" else RELEASED_PERFECT_TEXTS

  def slot_texts(self, texts: Sequence[str]) -> list:
    """The three failure texts -> the `text_slots` prompts the text encoder sees."""
    texts = list(texts)
    if len(texts) != 3:
      raise ValueError(f"a reward has 3 failure texts, got {len(texts)}: {texts}")
    return texts if self.form == "paper" else [join_texts(texts)]

  def null_reward(self, empty_pooled, batch: int = 1) -> RewardInputs:
    """The null reward for `batch` samples: NULL_SCORE scores and, in every text slot, the pooled
    text features of the empty prompt (`empty_pooled`: [D] or [1, D])."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel  (this module stays JAX-free)

    pooled = jnp.reshape(empty_pooled, (-1,))
    return RewardInputs(
        jnp.full((batch, 3), NULL_SCORE, jnp.float32),
        jnp.broadcast_to(pooled, (batch, self.text_slots, pooled.shape[0])),
    )


def parse_scores(text: str) -> tuple:
  """ "5,4.5,3" -> (5.0, 4.5, 3.0): three scores in [0, 5] (following, preserving, quality)."""
  try:
    values = tuple(float(v) for v in text.split(","))
  except ValueError:
    values = ()
  if len(values) != 3 or not all(0.0 <= v <= 5.0 for v in values):
    raise ValueError(f"a reward is three scores in [0, 5] like 5,5,5; got {text!r}")
  return values


def parse_texts(values) -> tuple | None:
  """Three failure texts as given on a command line (one per perspective; "*" keeps that
  perspective's text: None), or None when none are given."""
  if not values:
    return None
  if len(values) != 3:
    raise ValueError(f"given three times, one text per perspective; got {len(values)}")
  return tuple(None if v == "*" else v for v in values)
