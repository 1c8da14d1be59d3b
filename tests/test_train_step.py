"""The train step itself (mre/train_step.py): conditioning and reward dropout, the null reward and
gradient accumulation (EMA and learning-rate schedules: tests/test_train_schedules.py).

The dropout tests run `micro_loss` eagerly with stand-in modules: the U-Net records what the step
feeds it, so the dropout masks of 20,000 samples are observed directly, at no compilation cost.
The other tests build a tiny from-scratch editor (8 px, a 2-level U-Net) and jit the real step.
"""

import dataclasses
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import reward as reward_recipe
from mre import model_setup
from mre.diffusion.schedule import schedule_from_config
from mre.editor import EditSettings, Editor
from mre.models.pixel import PixelSpace
from mre.models.reward_config import NULL_SCORE
from mre.pipeline import tokenize
from mre.train_step import (
    SplitModel,
    StepContext,
    TrainState,
    edit_region_share_weight,
    edit_region_weight,
    edit_size_balance,
    elementwise_loss,
    make_train_step,
    micro_loss,
)

N = 20_000  # samples for the statistical tests: 5 binomial sd of a 5% rate is 0.0077
TINY = {
    "data.resolution": 8,
    "model.scratch.unet_channels": (8, 16),
    "model.scratch.heads": 2,
    "model.scratch.attention_from_level": 0,
    "model.scratch.text_hidden": 16,
    "model.scratch.text_layers": 1,
    "model.scratch.text_heads": 2,
    "model.reward.score_dim": 8,
    "model.reward.heads": 2,
    "model.reward.attn_dropout": 0.0,
    "train.snr_gamma": 0.0,
    # The 3 x 3 conv_out, not the recipe's zero-initialised pixel head: these tests compare losses
    # and gradients of the whole network, which a zero output layer would hide.
    "model.scratch.pixel_head": 0,
    "model.scratch.pixel_head_only": False,
    "model.scratch.pixel_head_input_scale": 1.0,
    "model.scratch.pixel_head_fourier": 0,
    "model.scratch.pixel_head_gate": False,
    # The edit region of the target alone: an untrained model's estimate changes every position,
    # which would make the stage-2 recipe's weight uniform here.
    "train.edit_weight_estimate": False,
}
WORDS = ["make", "the", "square", "circle", "red", "blue", "green", "bigger", "move", "left"]


def _config(**overrides):
  c = reward_recipe.get_config("toy")
  for key, value in {**TINY, **overrides}.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


def _within(rate, p, n, sds=5.0):
  """|rate - p| within `sds` binomial standard deviations of n draws at probability p."""
  return abs(rate - p) <= sds * math.sqrt(p * (1 - p) / n)


# --- stand-ins: what the step feeds the U-Net, observed -------------------------------------------


def _recording_unet(calls):
  class Recorder(nnx.Module):

    def __call__(self, sample, t, context, **kwargs):
      calls.append(
          {
              "sample": np.asarray(sample),
              "context": np.asarray(context),
              **{k: jax.tree.map(np.asarray, v) for k, v in kwargs.items()},
          }
      )
      return jnp.zeros(sample.shape[:-1] + (1,), sample.dtype)

  return Recorder()


def _stub_text(ids):
  """Token ids -> (context [n, 77, 1]: the ids, pooled [n, 2]: their sum); empty ids are 0."""
  ids = jnp.asarray(ids, jnp.float32)
  return ids[..., None], jnp.repeat(ids.sum(-1, keepdims=True), 2, axis=-1)


def _observed(cfg, with_reward=False, n=N, seed=0):
  """Runs micro_loss eagerly on n samples and returns the U-Net's inputs.

  Instruction ids are ones and the empty prompt's zeros, the image latent is ones, reward texts are
  twos and scores 4: whatever the step dropped shows as zeros (or NULL_SCORE) in the record.
  """
  calls = []
  ctx = StepContext(
      unet=None,
      text_encoder=None,
      vae=None,
      frozen={},
      schedule=schedule_from_config(model_setup.scheduler_config(cfg)),
      empty_ids=jnp.zeros((1, 77), jnp.int32),
      reward=model_setup.reward_config(cfg) if with_reward else None,
      cfg=cfg,
  )
  ctx.modules = lambda params: (_recording_unet(calls), _stub_text, PixelSpace())
  batch = {
      "instruction_ids": jnp.ones((n, 77), jnp.int32),
      "original_latent": jnp.ones((n, 1, 1, 1), jnp.float32),
      "edited_mean": jnp.zeros((n, 1, 1, 1), jnp.float32),
      "edited_logvar": jnp.full((n, 1, 1, 1), -30.0, jnp.float32),
  }
  if with_reward:
    slots = ctx.reward.text_slots
    batch["reward_ids"] = jnp.full((n, slots, 77), 2, jnp.int32)
    batch["reward_scores"] = jnp.full((n, 3), 4.0, jnp.float32)
  loss = micro_loss(ctx, {}, batch, jax.random.key(seed))
  assert np.isfinite(float(loss)) and len(calls) == 1
  return calls[0]


def _cond_masks(seen):
  context, image = seen["context"][..., 0], seen["sample"][:, 0, 0, 1]
  drop_text, drop_image = np.all(context == 0, axis=1), image == 0
  # Each sample sees either its own condition or the empty one, nothing in between.
  assert np.all(drop_text | np.all(context == 1, axis=1))
  assert np.all(drop_image | (image == 1))
  return drop_text, drop_image


@pytest.mark.parametrize("p", [0.05, 0.1])
def test_conditioning_dropout_drops_text_image_and_both_at_p_each(p):
  """InstructPix2Pix: p of the samples lose the text only, p the image only, p both (not p^2)."""
  drop_text, drop_image = _cond_masks(_observed(_config(**{"train.cond_dropout": p})))
  rates = {
      "text only": np.mean(drop_text & ~drop_image),
      "image only": np.mean(~drop_text & drop_image),
      "both": np.mean(drop_text & drop_image),
  }
  for name, rate in rates.items():
    assert _within(rate, p, N), f"{name}: {rate:.4f}, expected {p} +- 5 sd"
  assert _within(np.mean(~drop_text & ~drop_image), 1 - 3 * p, N)


def test_no_conditioning_dropout_at_p_zero():
  drop_text, drop_image = _cond_masks(_observed(_config(**{"train.cond_dropout": 0.0}), n=512))
  assert not drop_text.any() and not drop_image.any()


def _reward_masks(seen, slots):
  scores, text = seen["reward"].scores, seen["reward"].text
  assert text.shape == (scores.shape[0], slots, 2)
  dropped = np.all(scores == NULL_SCORE, axis=1)
  # A whole reward is replaced, scores and every text slot together, or nothing of it.
  np.testing.assert_array_equal(scores[~dropped], 4.0)
  np.testing.assert_array_equal(text[~dropped], 2 * 77)  # the reward texts' pooled stand-in
  np.testing.assert_array_equal(text[dropped], 0.0)  # the empty prompt's
  return dropped


@pytest.mark.parametrize("form,prob", [("paper", 0.1), ("released", 0.3)])
def test_reward_dropout_is_per_sample_at_the_configured_rate(form, prob):
  cfg = _config(
      **{"model.reward.form": form, "model.reward.dropout_prob": prob, "train.cond_dropout": 0.1}
  )
  seen = _observed(cfg, with_reward=True)
  dropped = _reward_masks(seen, 3 if form == "paper" else 1)
  assert _within(dropped.mean(), prob, N), dropped.mean()
  # Drawn per sample and independently of the conditioning dropout.
  drop_text, _ = _cond_masks(seen)
  joint = 0.2 * prob  # P(text dropped) = 2p = 0.2
  assert _within(np.mean(dropped & drop_text), joint, N), (np.mean(dropped & drop_text), joint)


def test_no_reward_dropout_at_prob_zero():
  seen = _observed(_config(**{"model.reward.dropout_prob": 0.0}), with_reward=True, n=512)
  assert not _reward_masks(seen, 3).any()


def test_reward_text_dropout_empties_single_texts_and_keeps_every_score():
  cfg = _config(**{"model.reward.text_dropout_prob": 0.3, "train.cond_dropout": 0.0})
  seen = _observed(cfg, with_reward=True)
  scores, text = seen["reward"].scores, np.asarray(seen["reward"].text)[..., 0]
  np.testing.assert_array_equal(scores, 4.0)  # no score is touched
  emptied = text == 0.0  # [samples, 3 slots]: the empty prompt's stand-in
  assert np.all(emptied | (text == 2 * 77))
  assert _within(emptied.mean(), 0.3, emptied.size), emptied.mean()
  # Drawn per text: all three emptied together only as often as independence says.
  assert _within(np.mean(emptied.all(axis=1)), 0.3**3, N)


# --- a tiny real editor ---------------------------------------------------------------------------


def _pipeline(cfg, tmp_path):
  return model_setup.build_scratch(cfg, WORDS, str(tmp_path / "tokenizer"), abstract=False)


def _context(cfg, pipe):
  """The StepContext as mre/train.py builds it (text encoder trained, as in the toy recipes)."""
  unet, text, vae = (SplitModel.of(m) for m in (pipe.unet, pipe.text_encoder, pipe.vae))
  ctx = StepContext(
      unet=unet,
      text_encoder=text,
      vae=vae,
      frozen={"vae": vae.params},
      schedule=schedule_from_config(pipe.scheduler_config),
      empty_ids=jnp.asarray(tokenize(pipe.tokenizer, [""])),
      reward=model_setup.reward_config(cfg),
      cfg=cfg,
  )
  return ctx, {"unet": unet.params, "text_encoder": text.params}


def _batch(pipe, n, seed=0, res=8):
  rs = np.random.RandomState(seed)
  texts = [" ".join(rs.choice(WORDS, 4)) for _ in range(n)]
  return {
      "original": jnp.asarray(rs.uniform(-1, 1, (n, res, res, 3)), jnp.float32),
      "edited": jnp.asarray(rs.uniform(-1, 1, (n, res, res, 3)), jnp.float32),
      "instruction_ids": jnp.asarray(tokenize(pipe.tokenizer, texts)),
      "reward_ids": jnp.asarray(tokenize(pipe.tokenizer, texts[::-1]))[:, None],
      "reward_scores": jnp.asarray(rs.uniform(0, 5, (n, 3)), jnp.float32),
      "noise": jnp.asarray(rs.randn(n, res, res, 3), jnp.float32),
      "timesteps": jnp.asarray(rs.randint(0, 1000, n), jnp.int32),
  }


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  """A tiny released-form editor (attention dropout 0: the default is set per test)."""
  cfg = _config(**{"model.reward.form": "released"})
  return _pipeline(cfg, tmp_path_factory.mktemp("released"))


@pytest.mark.parametrize("form", ["paper", "released"])
def test_trainer_null_reward_equals_the_editors(form, tmp_path, released):
  cfg = _config(**{"model.reward.form": form, "model.reward.dropout_prob": 0.9})
  pipe = released if form == "released" else _pipeline(cfg, tmp_path)
  slots = 3 if form == "paper" else 1
  calls = []
  ctx, params = _context(cfg, pipe)
  unet, text, vae = ctx.modules(params)
  ctx.modules = lambda p: (_recording_unet(calls), text, vae)
  n = 16
  batch = _batch(pipe, n)
  batch["reward_ids"] = jnp.repeat(batch["reward_ids"], slots, axis=1)
  micro_loss(ctx, params, batch, jax.random.key(1))
  got = calls[0]["reward"]
  dropped = np.all(got.scores == NULL_SCORE, axis=1)
  assert 0 < dropped.sum() < n
  null = Editor(pipe, EditSettings(steps=2, resolution=8)).null_reward(n)
  np.testing.assert_array_equal(got.scores[dropped], np.asarray(null.scores)[dropped])
  assert got.text.shape == null.text.shape == (n, slots, 16)
  np.testing.assert_allclose(got.text[dropped], np.asarray(null.text)[dropped], atol=1e-6, rtol=0)
  # ...and it is not some other text's features: the kept rewards differ from it.
  assert np.abs(got.text[~dropped] - np.asarray(null.text)[~dropped]).max() > 1e-3


def test_released_attention_dropout_is_on_in_the_train_step(released):
  """The release's BERT-style dropout applies in training (README: "dropout 0.1 in training
  only"): with noise and timesteps fixed, the loss then depends on the step key; without it not."""
  cfg = _config(**{"model.reward.form": "released", "train.cond_dropout": 0.0})
  batch = _batch(released, 4)
  losses = {}
  for rate in (0.0, 0.5):
    unet = nnx.clone(released.unet)
    unet.ca.dropout.rate = rate
    ctx, params = _context(cfg, dataclasses.replace(released, unet=unet))
    loss = jax.jit(lambda p, k, ctx=ctx: micro_loss(ctx, p, batch, k))
    losses[rate] = [float(loss(params, jax.random.key(k))) for k in (0, 1)]
  np.testing.assert_allclose(*losses[0.0], rtol=1e-5)  # only the posterior's 3e-7 noise differs
  assert abs(losses[0.5][0] - losses[0.5][1]) > 1e-3 * abs(losses[0.5][0]), losses


def _state(params, step=0, tx=None, ema=None):
  return TrainState(
      step=jnp.int32(step),
      params=params,
      ema=jax.tree.map(jnp.copy, params) if ema is None else ema,
      opt_state=(tx.init(params) if tx is not None else None),
      rng=jax.random.key_data(jax.random.key(0)),
  )


def _leaves(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _gradient_keeper():
  """An 'optimizer' that leaves the parameters alone and keeps the gradient as its state."""
  zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
  return optax.GradientTransformation(
      zeros, lambda grads, state, params=None: (zeros(grads), grads)
  )


def test_k_micro_batches_equal_one_batch_k_times_larger(released):
  """4 micro-batches of 2 (a scan) and one batch of 8 (no loop): the same loss and gradient, with
  the noise and timesteps fixed by the batch and no dropout of any kind."""
  cfg = _config(**{"model.reward.form": "released", "train.cond_dropout": 0.0})
  ctx, params = _context(cfg, released)
  tx = _gradient_keeper()
  step = jax.jit(make_train_step(ctx, tx))
  batch = _batch(released, 8)
  results = {}
  for accum in (1, 4):
    shaped = jax.tree.map(lambda x: x.reshape((accum, 8 // accum) + x.shape[1:]), batch)
    state, metrics = step(_state(params, tx=tx), shaped)
    assert bool(metrics["finite"])
    results[accum] = (float(metrics["loss"]), float(metrics["grad_norm"]), state.opt_state)
  loss, norm, grads = results[1]
  got_loss, got_norm, got_grads = results[4]
  np.testing.assert_allclose(got_loss, loss, rtol=2e-5)
  np.testing.assert_allclose(got_norm, norm, rtol=2e-5)
  assert norm > 1e-3
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  scale = max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(grads))
  nonzero = 0
  for (path, want), got in zip(flat, jax.tree.leaves(got_grads)):
    want, got = np.asarray(want), np.asarray(got)
    # Relative to the leaf, with a floor for gradients that are exactly zero but for rounding
    # (attention key biases: softmax ignores a bias added to every key).
    tol = 1e-5 * np.abs(want).max() + 1e-6 * scale
    np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=jax.tree_util.keystr(path))
    nonzero += np.abs(want).max() > 1e-6 * scale
  assert nonzero > 50  # the U-Net, the reward modules and the text encoder all have gradients
  # Not a vacuous comparison: another batch of the same size gives another loss.
  other = _batch(released, 8, seed=1)
  _, metrics = step(_state(params, tx=tx), jax.tree.map(lambda x: x[None], other))
  assert abs(float(metrics["loss"]) - loss) > 1e-3 * loss


def test_edit_region_weight_marks_positions_changed_beyond_the_threshold():
  source = jnp.zeros((1, 2, 3, 3))
  target = source.at[0, 0, 0, 2].set(-0.5).at[0, 1, 2, 0].set(0.1)  # one edit, one small change
  weight = np.asarray(edit_region_weight(target, source, 4.0, 0.25))
  assert weight.shape == (1, 2, 3, 1)
  want = np.ones((1, 2, 3, 1))
  want[0, 0, 0, 0] = 5.0
  np.testing.assert_array_equal(weight, want)


def test_smoothed_edit_region_keeps_flat_changes_and_drops_pixel_noise():
  """A 4 x 4 recoloured block survives a 3 x 3 average; noise of sigma 0.3 (past the per-position
  threshold at many pixels) and a lone changed pixel do not."""
  rng = np.random.default_rng(0)
  source = jnp.zeros((2, 12, 12, 3))
  block = source.at[0, 2:6, 2:6, 1].set(0.8)  # a flat edit; the rest unchanged
  noisy = source + 0.3 * rng.standard_normal((2, 12, 12, 3)).astype(np.float32)
  plain = np.asarray(edit_region_weight(noisy, source, 1.0, 0.25))
  smooth = np.asarray(edit_region_weight(noisy, source, 1.0, 0.25, smoothing=3))
  assert (plain > 1).mean() > 0.5  # the per-position region is most of a noisy image
  assert (smooth > 1).mean() < 0.05
  region = np.asarray(edit_region_weight(block, source, 1.0, 0.25, smoothing=3))[0, ..., 0] > 1
  counts = np.zeros((12, 12))  # block pixels in each position's 3 x 3 window (inside the image)
  for r in range(12):
    for c in range(12):
      counts[r, c] = sum(
          2 <= i < 6 and 2 <= j < 6 for i in (r - 1, r, r + 1) for j in (c - 1, c, c + 1)
      )
  want = 0.8 * counts / 9 > 0.25  # none of these windows touch the image border
  assert want[2:6, 2:6].all() and want.sum() == 16 + 8  # the block and 2 x 4 edge neighbours
  np.testing.assert_array_equal(region, want)
  lone = np.asarray(edit_region_weight(source.at[1, 5, 5, 0].set(1.0), source, 1.0, 0.25, 3))
  assert (lone > 1).sum() == 0
  with pytest.raises(ValueError, match="odd"):
    edit_region_weight(block, source, 1.0, 0.25, smoothing=2)


def test_dilated_edit_region_covers_the_edits_surroundings():
  """Dilation d marks every position within d (chessboard distance) of a changed one, clipped at the
  image border; d = 0 is the region itself."""
  source = jnp.zeros((1, 9, 9, 3))
  target = source.at[0, 4, 4, 2].set(1.0).at[0, 0, 8, 0].set(-1.0)  # centre and a corner
  for d in (0, 1, 2):
    region = np.asarray(edit_region_weight(target, source, 1.0, 0.25, dilation=d))[0, ..., 0] > 1
    want = np.zeros((9, 9), bool)
    want[4 - d : 5 + d, 4 - d : 5 + d] = True
    want[: d + 1, 8 - d :] = True
    np.testing.assert_array_equal(region, want)


def test_edit_weight_weights_the_squared_error_inside_the_edited_region(released):
  """Per sample the weighted loss is (S + w R) / (E + w M): S the summed squared error, R its part
  inside the changed region, E the elements and M those inside. R solved from two strengths agrees,
  and lies strictly between 0 and S (the region is the edited pixels, not the image)."""
  batch = _batch(released, 1)
  original = batch["original"]
  batch["edited"] = original.at[:, :2, :3].add(0.5).at[:, 5, 5, 0].add(0.1)
  elements, inside = 8 * 8 * 3, 2 * 3 * 3
  key = jax.random.key(3)

  def loss(strength):
    cfg = _config(
        **{
            "model.reward.form": "released",
            "train.cond_dropout": 0.0,
            "train.edit_weight": strength,
        }
    )
    ctx, params = _context(cfg, released)
    return float(micro_loss(ctx, params, batch, key))

  total = loss(0.0) * elements
  solved = [(loss(w) * (elements + w * inside) - total) / w for w in (3.0, 50.0)]
  np.testing.assert_allclose(solved[0], solved[1], rtol=1e-4)
  assert 0.0 < solved[0] < total
  assert abs(solved[0] / inside - total / elements) > 1e-3 * total / elements


def test_estimate_edit_weight_also_weights_the_changes_the_model_makes():
  """edit_weight_estimate: the weight also falls where the model's estimate is on the weighted
  side. An object edit (position 0 changed) whose estimate also changes position 3 weighs 3 as it
  weighs 0; a background edit (positions 0-7 changed, minority weight on 8 and 9) whose estimate
  leaves position 2 unchanged weighs 2 too, and the estimate's correct changes weigh nothing
  extra. With the estimate's changes weighted, an object the model changes costs 1 + w whether
  or not it was the one to change, so the weight no longer pulls unsure estimates towards a
  change."""
  source = jnp.zeros((2, 1, 10, 3))
  target = source.at[0, 0, 0].set(0.8).at[1, 0, :8].set(-0.6)
  estimate = target.at[0, 0, 3].set(0.7).at[1, 0, 2].set(0.0)
  weight = np.asarray(
      edit_region_weight(target, source, 4.0, 0.25, minority=True, estimate=estimate)
  )[:, 0, :, 0]
  want = np.ones((2, 10))
  want[0, [0, 3]] = 5.0
  want[1, [2, 8, 9]] = 5.0
  np.testing.assert_array_equal(weight, want)
  # Without the minority rule the estimate's changes join the target's changed region.
  plain = np.asarray(edit_region_weight(target, source, 4.0, 0.25, estimate=estimate))[:, 0, :, 0]
  np.testing.assert_array_equal(plain[0], want[0])
  np.testing.assert_array_equal(plain[1], [5.0] * 8 + [1.0] * 2)


def test_estimate_edit_weight_reaches_the_step_loss(released):
  """With a threshold below every difference the untrained model's estimate makes, the estimate's
  region is the whole image: the weight is uniform and the loss is the plain one, where the
  target's region alone (a 2 x 3 block) weights the loss unevenly."""
  batch = _batch(released, 2)
  batch["edited"] = batch["original"].at[:, :2, :3].add(0.5)
  key = jax.random.key(3)

  def loss(**train):
    overrides = {"model.reward.form": "released", "train.cond_dropout": 0.0}
    cfg = _config(**overrides, **{f"train.{k}": v for k, v in train.items()})
    ctx, params = _context(cfg, released)
    return float(micro_loss(ctx, params, batch, key))

  plain = loss(edit_weight=0.0)
  target_only = loss(edit_weight=4.0, edit_threshold=1e-4)
  with_estimate = loss(edit_weight=4.0, edit_threshold=1e-4, edit_weight_estimate=True)
  assert abs(target_only - plain) > 1e-3 * plain
  np.testing.assert_allclose(with_estimate, plain, rtol=1e-5)


def test_pseudo_huber_is_quadratic_for_small_errors_and_linear_for_large_ones():
  c = 0.03
  error = jnp.asarray([0.0, 1e-4, -1e-4, 0.5, -2.0, 3.0])
  huber = np.asarray(elementwise_loss(error, "pseudo_huber", c))
  np.testing.assert_allclose(huber[:3], np.asarray(error[:3]) ** 2, rtol=1e-4, atol=1e-12)
  # Far beyond c: 2c (|e| - c), so the gradient stays 2c however large the error.
  np.testing.assert_allclose(huber[3:], 2 * c * (np.abs(np.asarray(error[3:])) - c), rtol=2e-3)
  assert np.all(huber[3:] < np.asarray(error[3:]) ** 2)
  np.testing.assert_array_equal(np.asarray(elementwise_loss(error, "mse")), np.asarray(error) ** 2)
  with pytest.raises(ValueError, match="unknown train.loss 'l1'"):
    elementwise_loss(error, "l1")


def test_pseudo_huber_step_loss_tends_to_the_squared_error_for_a_large_scale(released):
  """The step's loss with the pseudo-Huber loss: below the squared error at a small scale, equal
  to it as the scale grows (the option reaches the loss, and only the per-element form changes)."""
  batch = _batch(released, 2)
  key = jax.random.key(5)

  def loss(**train):
    overrides = {
        "model.reward.form": "released",
        "train.cond_dropout": 0.0,
        "train.edit_weight": 4.0,
    }
    cfg = _config(**overrides, **{f"train.{k}": v for k, v in train.items()})
    ctx, params = _context(cfg, released)
    return float(micro_loss(ctx, params, batch, key))

  mse = loss(loss="mse")
  np.testing.assert_allclose(loss(loss="pseudo_huber", huber_c=1e4), mse, rtol=1e-4)
  assert loss(loss="pseudo_huber", huber_c=0.03) < 0.5 * mse


def test_edit_size_balance_evens_out_edit_sizes_with_batch_mean_one():
  """Weights (share changed, at least the floor) ** -power over their batch mean: an object edit
  of 4 of 64 positions weighs 16x a full-image edit at power 1, 4x at power 0.5; an empty edit
  counts as the floor's share, and so does an edit smaller than it."""
  source = jnp.zeros((3, 8, 8, 3))
  target = source.at[0, 2:4, 2:4, 0].set(1.0).at[1].set(-0.6)  # object, whole image, nothing
  shares = np.array([4 / 64, 1.0, 0.05])  # the empty edit at floor 0.05
  for power in (1.0, 0.5):
    got = np.asarray(edit_size_balance(target, source, power, 0.25, 1, 0.05))
    want = shares**-power / np.mean(shares**-power)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.mean() == pytest.approx(1.0)
  assert got[0] / got[1] == pytest.approx(4.0)
  capped = np.asarray(edit_size_balance(target, source, 1.0, 0.25, 1, 0.1))
  assert capped[0] == pytest.approx(capped[2])


def test_edit_balance_weights_each_samples_loss_by_its_edit_size(released):
  """The step's loss with `train.edit_balance` is the mean of the per-sample losses (each computed
  alone) weighted by `edit_size_balance`: a 2 x 2 object edit against a whole-image one."""
  batch = _batch(released, 2)
  original = batch["original"]
  batch["edited"] = original.at[0, 2:4, 2:4].add(0.5).at[1].add(-0.5)
  key = jax.random.key(5)

  def loss(b, balance):
    cfg = _config(
        **{
            "model.reward.form": "released",
            "train.cond_dropout": 0.0,
            "train.edit_balance": balance,
            "train.edit_balance_floor": 0.01,
        }
    )
    ctx, params = _context(cfg, released)
    return float(micro_loss(ctx, params, b, key))

  alone = [loss(jax.tree.map(lambda x: x[i : i + 1], batch), 0.0) for i in (0, 1)]
  weights = np.array([64 / 4, 1.0]) / np.mean([64 / 4, 1.0])
  assert loss(batch, 0.0) == pytest.approx(np.mean(alone), rel=1e-5)
  assert loss(batch, 1.0) == pytest.approx(np.mean(weights * np.array(alone)), rel=1e-5)


def _calls_of_the_step(released, self_condition, **train):
  """The U-Net calls of one micro_loss on a tiny released-form editor whose U-Net is replaced by
  a recorder returning 0.25 + 0.5 x (its noisy input): its x0 estimate (no source skip)."""
  cfg = _config(
      **{"model.reward.form": "released", "train.cond_dropout": 0.0},
      **{f"train.{k}": v for k, v in train.items()},
  )
  ctx, params = _context(cfg, released)
  _, text, vae = ctx.modules(params)
  calls = []

  class Recorder(nnx.Module):
    config = types.SimpleNamespace(self_condition=self_condition)

    def __call__(self, sample, t, context, **kwargs):
      calls.append({"sample": sample, "t": t, "self_cond": kwargs.get("self_cond")})
      return 0.25 + 0.5 * sample[..., :3]

  ctx.modules = lambda p: (Recorder(), text, vae)
  batch = _batch(released, 8)
  loss = micro_loss(ctx, params, batch, jax.random.key(3))
  return calls, batch, ctx.schedule, float(loss)


def test_self_conditioned_step_feeds_the_first_calls_estimate_to_the_second(released):
  calls, batch, _, _ = _calls_of_the_step(released, True, self_condition_prob=1.0)
  assert len(calls) == 2 and calls[0]["self_cond"] is None
  np.testing.assert_allclose(
      np.asarray(calls[1]["self_cond"]),
      np.asarray(0.25 + 0.5 * calls[0]["sample"][..., :3]),
      atol=1e-6,
  )
  calls, _, _, _ = _calls_of_the_step(released, True, self_condition_prob=0.0)
  assert not np.asarray(calls[1]["self_cond"]).any()
  calls, _, _, _ = _calls_of_the_step(released, False)
  assert len(calls) == 1 and calls[0]["self_cond"] is None


def test_rollout_step_trains_on_the_ddim_step_from_the_first_calls_estimate(released):
  """train.rollout_prob 1: a first call at t + gap, and the trained call's noisy input is the DDIM
  step from its estimate; rollout_prob 0: one call on the usual noisy input."""
  plain, batch, schedule, plain_loss = _calls_of_the_step(released, False)
  calls, _, _, loss = _calls_of_the_step(released, False, rollout_prob=1.0, rollout_gap=50)
  assert len(plain) == 1 and len(calls) == 2
  t = np.asarray(batch["timesteps"])
  np.testing.assert_array_equal(np.asarray(calls[0]["t"]), np.minimum(t + 50, 999))
  ab = np.asarray(schedule.alphas_cumprod, np.float64)
  x0 = np.asarray(batch["edited"], np.float64)
  source = np.asarray(batch["original"], np.float64)
  t_b = np.minimum(t + 50, 999)
  a_b, s_b = (np.sqrt(v)[:, None, None, None] for v in (ab[t_b], 1 - ab[t_b]))
  a, s = (np.sqrt(v)[:, None, None, None] for v in (ab[t], 1 - ab[t]))
  before = a_b * x0 + s_b * np.asarray(batch["noise"])
  estimate = 0.25 + 0.5 * before
  eps_hat = (before - a_b * estimate) / s_b
  np.testing.assert_allclose(
      np.asarray(calls[1]["sample"][..., :3]), a * estimate + s * eps_hat, atol=1e-4
  )
  np.testing.assert_allclose(np.asarray(calls[1]["sample"][..., 3:]), source, atol=1e-6)
  assert loss != plain_loss


def test_edit_region_share_gives_the_changed_region_its_share_of_each_samples_loss():
  """A background edit (8 of 10 positions changed) and an object edit (1 of 10): the changed
  region holds `share` of the weight in both, the rest 1 - share; an unchanged sample is uniform."""
  source = jnp.zeros((3, 2, 5, 3))
  target = source.at[0, :, :4].set(0.8).at[1, 0, 0].set(-0.6)
  weight = np.asarray(edit_region_share_weight(target, source, 0.3, 0.25))
  assert weight.shape == (3, 2, 5, 1)
  np.testing.assert_allclose(weight.mean(axis=(1, 2, 3)), 1.0, rtol=1e-6)
  changed = np.zeros((3, 2, 5), bool)
  changed[0, :, :4] = True
  changed[1, 0, 0] = True
  for i in (0, 1):
    np.testing.assert_allclose(weight[i][changed[i]].sum() / weight[i].sum(), 0.3, rtol=1e-5)
  np.testing.assert_array_equal(weight[2], 1.0)
  # the untouched objects of the background edit: (1 - 0.3) / 0.2 = 3.5 each, where edit_weight 4
  # gives them 1 / 4.2 (weights 5 and 1 normalised by their mean, (8 x 5 + 2) / 10)
  np.testing.assert_allclose(weight[0][~changed[0]], 0.7 / 0.2, rtol=1e-5)


def test_edit_region_share_and_edit_weight_are_not_combined(released):
  cfg = _config(
      **{"model.reward.form": "released", "train.edit_weight": 4.0, "train.edit_region_share": 0.5}
  )
  ctx, params = _context(cfg, released)
  with pytest.raises(ValueError, match="edit_region_share"):
    micro_loss(ctx, params, _batch(released, 2), jax.random.key(0))


def test_minority_edit_weight_falls_on_the_smaller_region():
  """edit_weight_minority: a background edit (8 of 10 positions changed) weights its 2 untouched
  positions; an object edit (1 of 10) its changed one, as the plain form does."""
  source = jnp.zeros((2, 2, 5, 3))
  target = source.at[0, :, :4].set(0.8).at[1, 0, 0].set(-0.6)
  weight = np.asarray(edit_region_weight(target, source, 4.0, 0.25, minority=True))[..., 0]
  want = np.ones((2, 2, 5))
  want[0, :, 4] = 5.0
  want[1, 0, 0] = 5.0
  np.testing.assert_array_equal(weight, want)
  plain = np.asarray(edit_region_weight(target, source, 4.0, 0.25))[..., 0]
  np.testing.assert_array_equal(plain[1], want[1])
  assert plain[0, 0, 0] == 5.0 and plain[0, 0, 4] == 1.0
