"""The train step's EMA warm-up and learning-rate schedules (mre/train_step.py), on a stand-in U-Net
with one parameter matrix, so each check compiles in moments."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mre import model_setup
from mre.diffusion.schedule import schedule_from_config
from mre.models.pixel import PixelSpace
from mre.train_step import (
    SplitModel,
    StepContext,
    ema_decay,
    lr_schedule,
    make_optimizer,
    make_train_step,
)
from tests.test_train_step import _config, _leaves, _state, _stub_text

# --- EMA and learning rate, on a one-parameter-matrix stand-in U-Net ----------------------------


class _LinearUNet(nnx.Module):

  def __init__(self):
    self.w = nnx.Param(jnp.asarray([[0.5], [-0.3]], jnp.float32))  # [noisy | image] -> 1 channel

  def __call__(self, sample, t, context, **kwargs):
    return sample @ self.w[...]


class _Text(nnx.Module):

  def __call__(self, ids):
    return _stub_text(ids)


def _linear_context(cfg):
  unet, text = SplitModel.of(_LinearUNet()), SplitModel.of(_Text())
  vae = SplitModel.of(PixelSpace())
  ctx = StepContext(
      unet=unet,
      text_encoder=text,
      vae=vae,
      frozen={"text_encoder": text.params, "vae": vae.params},
      schedule=schedule_from_config(model_setup.scheduler_config(cfg)),
      empty_ids=jnp.zeros((1, 77), jnp.int32),
      reward=None,
      cfg=cfg,
  )
  rs = np.random.RandomState(0)
  batch = {
      "instruction_ids": jnp.ones((1, 4, 77), jnp.int32),
      "original_latent": jnp.asarray(rs.randn(1, 4, 2, 2, 1), jnp.float32),
      "edited_mean": jnp.asarray(rs.randn(1, 4, 2, 2, 1), jnp.float32),
      "edited_logvar": jnp.full((1, 4, 2, 2, 1), -30.0, jnp.float32),
  }
  return ctx, {"unet": unet.params}, batch


def test_ema_decay_warms_up_as_one_plus_step_over_ten_plus_step():
  # (diffusers' EMAModel gives the same values from its second update on; its first has decay 0.)
  decay = lambda s, m=0.9999: float(ema_decay(jnp.int32(s), m))
  np.testing.assert_allclose(decay(0), 1 / 10, rtol=1e-6)
  np.testing.assert_allclose(decay(1), 2 / 11, rtol=1e-6)
  np.testing.assert_allclose(decay(10), 11 / 20, rtol=1e-6)
  np.testing.assert_allclose(decay(10**7), 0.9999, rtol=1e-7)  # capped at the configured decay
  np.testing.assert_allclose(decay(10**7, 0.995), 0.995, rtol=1e-7)
  assert all(decay(s) < decay(s + 1) for s in (0, 1, 10, 100, 1000))


def test_the_step_updates_the_ema_with_the_decay_of_its_step():
  cfg = _config(**{"train.ema_decay": 0.999})
  ctx, params, batch = _linear_context(cfg)
  tx = optax.sgd(0.1)
  step = jax.jit(make_train_step(ctx, tx))
  ema0 = jax.tree.map(lambda x: x + 1.0, params)  # apart from the parameters, to see the mix
  for s, d in [(0, 0.1), (1, 2 / 11), (10, 0.55), (10**6, 0.999)]:
    state, metrics = step(_state(params, step=s, tx=tx, ema=ema0), batch)
    assert int(state.step) == s + 1 and bool(metrics["finite"])
    (new,), (ema,), (old_ema,) = _leaves(state.params), _leaves(state.ema), _leaves(ema0)
    assert np.abs(new - _leaves(params)[0]).max() > 1e-4  # the parameters did move
    np.testing.assert_allclose(
        ema, d * old_ema + (1 - d) * new, rtol=1e-6, atol=1e-7, err_msg=f"step {s}"
    )


def _lr(kind, warmup, steps=100, lr=1e-3):
  return lr_schedule(
      _config(
          **{
              "train.lr_schedule": kind,
              "train.warmup_steps": warmup,
              "train.steps": steps,
              "train.lr": lr,
          }
      )
  )


def test_constant_schedule_with_and_without_warmup():
  f = _lr("constant", 0)
  assert [float(f(s)) for s in (0, 1, 50, 100, 10**6)] == pytest.approx([1e-3] * 5, rel=1e-6)
  f = _lr("constant", 10)
  np.testing.assert_allclose(
      [float(f(s)) for s in (0, 5, 10, 11, 100)],
      [0.0, 5e-4, 1e-3, 1e-3, 1e-3],
      rtol=1e-6,
      atol=1e-12,
  )


def test_cosine_schedule_with_warmup():
  f = _lr("cosine", 10, steps=110)
  end = 0.05 * 1e-3  # the recipe's floor: 5% of the peak
  np.testing.assert_allclose(
      [float(f(s)) for s in (0, 5, 10)], [0.0, 5e-4, 1e-3], rtol=1e-6, atol=1e-12
  )
  np.testing.assert_allclose(float(f(60)), end + (1e-3 - end) / 2, rtol=1e-5)  # half way down
  np.testing.assert_allclose(
      float(f(35)), end + (1e-3 - end) * (1 + math.cos(math.pi / 4)) / 2, rtol=1e-5
  )
  np.testing.assert_allclose([float(f(s)) for s in (110, 500)], [end, end], rtol=1e-5)
  values = [float(f(s)) for s in range(10, 111)]
  assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_schedule_without_warmup_starts_at_the_peak():
  f = _lr("cosine", 0, steps=100)
  end = 0.05 * 1e-3
  np.testing.assert_allclose(
      [float(f(s)) for s in (0, 50, 100)], [1e-3, end + (1e-3 - end) / 2, end], rtol=1e-5
  )


def test_unknown_schedule_is_refused():
  with pytest.raises(ValueError, match="is not 'constant' or 'cosine'"):
    _lr("linear", 0)


@pytest.mark.parametrize(
    "kind,warmup,first_lr",
    [("constant", 0, 1e-3), ("cosine", 0, 1e-3), ("constant", 10, 0.0), ("cosine", 10, 0.0)],
)
def test_the_optimizer_and_the_logged_lr_follow_the_schedule(kind, warmup, first_lr):
  """Adam's first update is lr * g / (|g| + eps): the learning rate of step 0, element-wise."""
  cfg = _config(
      **{
          "train.lr_schedule": kind,
          "train.warmup_steps": warmup,
          "train.steps": 100,
          "train.lr": 1e-3,
          "train.weight_decay": 0.0,
          "train.clip": 0.0,
      }
  )
  ctx, params, batch = _linear_context(cfg)
  tx = make_optimizer(cfg)
  step = jax.jit(make_train_step(ctx, tx))
  state, metrics = step(_state(params, tx=tx), batch)
  np.testing.assert_allclose(float(metrics["lr"]), first_lr, rtol=1e-6, atol=1e-12)
  moved = np.abs(_leaves(state.params)[0] - _leaves(params)[0])
  np.testing.assert_allclose(moved, first_lr, rtol=1e-3, atol=1e-9)
  state, metrics = step(state, batch)
  np.testing.assert_allclose(float(metrics["lr"]), float(lr_schedule(cfg)(1)), rtol=1e-6)


def test_a_passed_learning_rate_is_the_schedule_taken_out_of_the_program():
  """The trainer passes each step's rate: the same update as the in-program schedule, and one
  compiled program for configs that differ only in steps and warm-up."""

  def setup(steps, warmup):
    cfg = _config(
        **{
            "train.lr_schedule": "cosine",
            "train.warmup_steps": warmup,
            "train.steps": steps,
            "train.lr": 1e-3,
        }
    )
    ctx, params, batch = _linear_context(cfg)
    tx = make_optimizer(cfg)
    return cfg, jax.jit(make_train_step(ctx, tx)), _state(params, tx=tx), batch

  cfg, step, state, batch = setup(100, 10)
  for _ in range(3):  # past the first step: the warm-up's rate differs from step to step
    state, _ = step(state, batch)
  inside, m_inside = step(state, batch)
  rate = jnp.float32(lr_schedule(cfg)(3))
  passed, m_passed = step(state, batch, rate)
  assert float(m_passed["lr"]) == float(rate) == pytest.approx(float(m_inside["lr"]), rel=1e-6)
  for a, b in zip(_leaves(inside.opt_state), _leaves(passed.opt_state)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(_leaves(inside.params)[0], _leaves(passed.params)[0], rtol=1e-6)
  texts = [s.lower(st, b, rate).as_text() for _, s, st, b in (setup(100, 10), setup(7, 0))]
  assert texts[0] == texts[1]
  in_program = [s.lower(st, b).as_text() for _, s, st, b in (setup(100, 10), setup(7, 0))]
  assert in_program[0] != in_program[1]  # not vacuous: the schedule is a constant otherwise
