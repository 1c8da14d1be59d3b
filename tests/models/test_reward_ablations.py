"""The reward ablations do what they say: a scores-only model ignores the failure texts, a texts-only
model ignores the scores, and a switched-off injection has no parameters and no effect.

Every reward parameter is randomised first: the paper form's output projections start at zero, and
a model whose reward path is the identity would pass any invariance test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mre.models.reward_config import RewardConfig, RewardInputs
from mre.models.reward_unet import RewardUNet, reward_unet_from_stage1
from mre.models.unet import UNet2DConditionModel

CFG = dict(
    sample_size=8,
    in_channels=8,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=2,
    norm_num_groups=8,
)
TEXT_DIM = 24  # pooled text width, apart from the context width so that no shape lines up by luck
# The reward modules (top-level names): the paper form's live under `reward`, the released form's
# at the top level under the release's names.
REWARD_MODULES = (
    "reward",
    "add_embedding",
    "add_embedding2",
    "text_linear",
    "text_linear2",
    "proj_deal",
    "ca",
)
LATENT_PATH = {
    "paper": {"reward.encoder"},
    "released": {"add_embedding2", "text_linear", "proj_deal", "ca"},
}
UNET_PATH = {"paper": {"reward.time_proj"}, "released": {"add_embedding", "text_linear2"}}
SCORE_PATH = {"paper": {"reward.tokens.score_mlp"}, "released": {"add_embedding", "add_embedding2"}}
TEXT_PATH = {"paper": set(), "released": {"text_linear", "text_linear2"}}


@pytest.fixture(scope="module")
def stage1():
  return UNet2DConditionModel(CFG, rngs=nnx.Rngs(0))


def _names(path):
  return [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]


def _reward_params(model):
  """{dotted path: array} of the reward modules' parameters."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
    names = [str(n) for n in _names(path) if n != "value"]
    if names[0] in REWARD_MODULES:
      out[".".join(names)] = leaf
  return out


def _modules(params):
  """The module prefixes present among `params` paths (all prefixes, up to the leaf's module)."""
  found = set()
  for name in params:
    parts = name.split(".")[:-1]
    found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
  return found


def _model(stage1, form, seed=1, **switches):
  """A reward U-Net on the stage-1 weights with every reward parameter random."""
  model = reward_unet_from_stage1(
      stage1,
      RewardConfig(form=form, heads=2, score_dim=16, **switches),
      seed=seed,
      text_dim=TEXT_DIM,
  )
  state = nnx.state(model, nnx.Param)
  rs = np.random.RandomState(seed)

  def randomize(path, x):
    names = [str(n) for n in _names(path)]
    if names[0] not in REWARD_MODULES:
      return x
    return jnp.asarray(rs.randn(*x.shape) * 0.3, x.dtype)

  nnx.update(model, jax.tree_util.tree_map_with_path(randomize, state))
  return model


def _inputs(form, seed=0, batch=2):
  rs = np.random.RandomState(seed)
  slots = 3 if form == "paper" else 1
  x = jnp.asarray(rs.randn(batch, 8, 8, 8), jnp.float32)
  t = jnp.asarray([10, 600][:batch])
  ctx = jnp.asarray(rs.randn(batch, 5, 32), jnp.float32)
  reward = RewardInputs(
      jnp.asarray(rs.uniform(0, 5, (batch, 3)), jnp.float32),
      jnp.asarray(rs.randn(batch, slots, TEXT_DIM), jnp.float32),
  )
  return x, t, ctx, reward


def _other(reward, seed, scores=False, texts=False):
  rs = np.random.RandomState(100 + seed)
  return RewardInputs(
      jnp.asarray(rs.uniform(0, 5, reward.scores.shape), jnp.float32) if scores else reward.scores,
      jnp.asarray(rs.randn(*reward.text.shape), jnp.float32) if texts else reward.text,
  )


def _max_diff(a, b):
  return float(jnp.abs(a - b).max())


@pytest.mark.parametrize("form", ["paper", "released"])
def test_scores_only_model_ignores_the_failure_texts(stage1, form):
  model = _model(stage1, form, use_texts=False)
  x, t, ctx, reward = _inputs(form)
  out = model(x, t, ctx, reward=reward)
  for seed in range(3):
    np.testing.assert_array_equal(
        np.asarray(model(x, t, ctx, reward=_other(reward, seed, texts=True))), np.asarray(out)
    )
  assert _max_diff(model(x, t, ctx, reward=_other(reward, 0, scores=True)), out) > 1e-4
  modules = _modules(_reward_params(model))
  assert not modules & TEXT_PATH[form]
  assert SCORE_PATH[form] <= modules
  if form == "paper":  # tokens are the score embedding alone: the encoder reads score_dim wide
    assert model.reward.tokens.width == 16
    assert model.reward.encoder.token_proj.kernel.shape == (16, 16)


@pytest.mark.parametrize("form", ["paper", "released"])
def test_texts_only_model_ignores_the_scores(stage1, form):
  model = _model(stage1, form, use_scores=False)
  x, t, ctx, reward = _inputs(form, seed=1)
  out = model(x, t, ctx, reward=reward)
  for seed in range(3):
    np.testing.assert_array_equal(
        np.asarray(model(x, t, ctx, reward=_other(reward, seed, scores=True))), np.asarray(out)
    )
  # Scores outside [0, 5] too (the null reward's -1): still nothing.
  null_scores = reward._replace(scores=jnp.full_like(reward.scores, -1.0))
  np.testing.assert_array_equal(np.asarray(model(x, t, ctx, reward=null_scores)), np.asarray(out))
  assert _max_diff(model(x, t, ctx, reward=_other(reward, 0, texts=True)), out) > 1e-4
  modules = _modules(_reward_params(model))
  assert not modules & SCORE_PATH[form]
  assert TEXT_PATH[form] <= modules
  if form == "paper":
    assert model.reward.tokens.width == TEXT_DIM


@pytest.mark.parametrize("form", ["paper", "released"])
def test_no_latent_injection_has_no_reward_encoder(stage1, form):
  full = _reward_params(_model(stage1, form))
  model = _model(stage1, form, inject_latent=False)
  params = _reward_params(model)
  # By the parameter tree: exactly the full model's reward parameters minus the latent path's.
  latent = {k for k in full if any(k == m or k.startswith(m + ".") for m in LATENT_PATH[form])}
  assert latent, "the full model has no latent-path parameters to compare with"
  assert set(params) == set(full) - latent
  assert not _modules(params) & LATENT_PATH[form]
  assert UNET_PATH[form] <= _modules(params)
  # By the forward pass: nothing after conv_in, only the time embedding term.
  x, t, ctx, reward = _inputs(form, seed=2)
  extra, after = model.reward_injections(reward)
  assert after is None and extra is not None
  out = model(x, t, ctx, reward=reward)
  np.testing.assert_allclose(
      np.asarray(out), np.asarray(stage1(x, t, ctx, extra_time_emb=extra)), atol=1e-6, rtol=0
  )
  assert _max_diff(out, stage1(x, t, ctx)) > 1e-4  # the reward does reach the time embedding


@pytest.mark.parametrize("form", ["paper", "released"])
def test_no_unet_injection_has_no_time_embedding_term(stage1, form):
  full = _reward_params(_model(stage1, form))
  model = _model(stage1, form, inject_unet=False)
  params = _reward_params(model)
  unet = {k for k in full if any(k == m or k.startswith(m + ".") for m in UNET_PATH[form])}
  assert unet, "the full model has no time-embedding parameters to compare with"
  assert set(params) == set(full) - unet
  assert not _modules(params) & UNET_PATH[form]
  assert LATENT_PATH[form] <= _modules(params)
  x, t, ctx, reward = _inputs(form, seed=3)
  extra, after = model.reward_injections(reward)
  assert extra is None and after is not None
  out = model(x, t, ctx, reward=reward)
  np.testing.assert_allclose(
      np.asarray(out), np.asarray(stage1(x, t, ctx, after_conv_in=after)), atol=1e-6, rtol=0
  )
  assert _max_diff(out, stage1(x, t, ctx)) > 1e-4  # the latent path does act


def test_both_injections_off_or_both_halves_off_is_refused():
  with pytest.raises(ValueError, match="injected somewhere"):
    RewardConfig(inject_latent=False, inject_unet=False)
  with pytest.raises(ValueError, match="needs scores, texts, or both"):
    RewardConfig(use_scores=False, use_texts=False)
