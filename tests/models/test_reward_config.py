"""RewardConfig, the one object for what a reward is: text slots, how the texts fill them, the
perfect texts (one source, also the judge's "nothing wrong" phrases) and the null reward."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from mre.judging import prompts
from mre.models.reward_config import (
    NULL_SCORE,
    PAPER_PERFECT_TEXTS,
    RELEASED_PERFECT_TEXTS,
    RewardConfig,
)


def test_slots_and_texts_per_form():
  paper, released = RewardConfig(form="paper"), RewardConfig(form="released")
  assert (paper.text_slots, released.text_slots) == (3, 1)
  assert paper.slot_texts(["a", "b", "c"]) == ["a", "b", "c"]
  assert released.slot_texts(["a", "b", "c"]) == ["a; b; c"]
  assert paper.perfect_texts == (
      "No negative aspects",
      "No unintended changes",
      "No noticeable issues",
  )
  assert released.perfect_texts == ("None", "None", "None") == RELEASED_PERFECT_TEXTS
  with pytest.raises(ValueError, match="3 failure texts"):
    paper.slot_texts(["a", "b"])


def test_the_judge_asks_for_the_paper_texts():
  assert list(prompts.NOTHING_WRONG.values()) == [t.lower() for t in PAPER_PERFECT_TEXTS]


@pytest.mark.parametrize("form,slots", [("paper", 3), ("released", 1)])
def test_null_reward_is_null_scores_and_the_empty_text_in_every_slot(form, slots):
  empty = jnp.arange(4.0)[None]  # pooled features of the empty prompt, [1, D]
  null = RewardConfig(form=form).null_reward(empty, batch=2)
  np.testing.assert_array_equal(np.asarray(null.scores), np.full((2, 3), NULL_SCORE))
  assert null.text.shape == (2, slots, 4)
  np.testing.assert_array_equal(
      np.asarray(null.text), np.broadcast_to(np.arange(4.0), (2, slots, 4))
  )


def test_the_module_loads_no_jax():
  """The judge prompts and grain's workers import it."""
  code = (
      "import sys, mre.models.reward_config, mre.judging.prompts; "
      "assert 'jax' not in sys.modules, 'jax loaded'"
  )
  subprocess.run([sys.executable, "-c", code], check=True)
