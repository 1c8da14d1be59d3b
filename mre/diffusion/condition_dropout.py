"""Training-time dropout of the conditions, which is what makes guidance possible at inference.

`conditioning_dropout` is InstructPix2Pix's (docs/method.md, "Conditioning dropout"): per sample,
the instruction is replaced by the empty prompt, the original image's latents by zeros, or both,
so that one network also predicts without the text, without the image and without either (the
branches of dual classifier-free guidance). `drop_rewards` is reward dropout: per sample, the
whole reward becomes the null reward (`RewardConfig.null_reward`), for reward guidance.
`drop_reward_texts` (ours) empties single failure texts and keeps their scores, so that a score
also has to speak for its perspective alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def conditioning_dropout(key, batch_size: int, p: float):
  """InstructPix2Pix conditioning dropout masks: (drop_text, drop_image), bool [batch_size].

  One uniform draw r per sample: r < 2p drops the text, p <= r < 3p the image, so p of the
  samples lose the text only, p the image only and p both (not p^2), as in InstructPix2Pix.
  """
  r = jax.random.uniform(key, (batch_size,))
  return r < 2 * p, (r >= p) & (r < 3 * p)


def drop_rewards(key, reward, null, prob: float):
  """Reward dropout: with probability `prob` per sample, the reward becomes the null reward.

  `reward` and `null` are pytrees of the same structure (`RewardInputs`) whose leaves have the
  batch first; `null`'s leaves broadcast to the reward's (a batch of 1 is enough). A whole reward
  is replaced, scores and every text slot together. The null reward is scores of NULL_SCORE and
  the features of empty failure texts; training with it makes reward guidance (a fourth guidance
  branch) possible at inference.
  """
  if prob <= 0:
    return reward
  batch = jax.tree.leaves(reward)[0].shape[0]
  drop = jax.random.uniform(key, (batch,)) < prob
  pick = lambda a, b: jnp.where(
      drop.reshape((-1,) + (1,) * (a.ndim - 1)), jnp.broadcast_to(b, a.shape).astype(a.dtype), a
  )
  return jax.tree.map(pick, reward, null)


def drop_reward_texts(key, reward, empty_pooled, prob: float):
  """Ours: with probability `prob` per sample and text slot, that failure text becomes the empty
  text (`empty_pooled`: its pooled features, [D] or [1, D]); the scores stay.

  Trained on the paper's rewards, a model reads the texts far more than the scores: a score of 5
  nearly always comes with "no negative aspects", so a lowered score beside that text is a pair it
  never saw. With some texts empty in training, a score must carry its perspective on its own, and
  at inference a lowered score with an empty text ("worse, for no stated reason") means something.
  """
  if prob <= 0:
    return reward
  batch, slots = reward.text.shape[:2]
  drop = jax.random.uniform(key, (batch, slots)) < prob
  empty = jnp.broadcast_to(jnp.reshape(empty_pooled, (1, 1, -1)), reward.text.shape)
  return reward._replace(
      text=jnp.where(drop[..., None], empty.astype(reward.text.dtype), reward.text)
  )
