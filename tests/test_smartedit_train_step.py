"""The SmartEdit training step (mre/smartedit_train_step.py) on a tiny random model: label
splicing, the LM cross-entropy, the trained/frozen split, the original vocabulary rows kept,
and the loss falling over a few steps on one batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mre.diffusion import make_schedule
from mre.models import smartedit as se
from mre.models.smartedit_prompt import IGNORE, prompt_batch
from mre.smartedit_train_step import (
    SmartEditLossConfig,
    SmartEditTrainer,
    lm_cross_entropy,
    smartedit_align_loss,
    smartedit_loss,
    splice_labels,
    trained_filter,
)
from tests.smartedit_fixtures import TEMPLATE, encode, rigged_model


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  prompts = prompt_batch(
      ["make it red", "turn the sky blue"], encode, answer=True, ids=cfg.tokens, template=TEMPLATE
  )
  images = jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
  return {
      "clip_pixels": se.clip_pixels(images, 16),
      "input_ids": jnp.asarray(prompts.input_ids),
      "attention_mask": jnp.asarray(prompts.attention_mask),
      "labels": jnp.asarray(prompts.labels),
      "target_latents": jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 3)), jnp.float32),
      "image_latents": images,
      "noise": jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32),
      "timesteps": jnp.asarray([30, 700]),
  }


def test_spliced_labels_line_up_with_the_spliced_ids():
  cfg = se.tiny_config(vocab_words=64, latent_channels=3)
  batch = _batch(cfg)
  ids, mask = batch["input_ids"], batch["attention_mask"]
  n = cfg.num_patches
  embed = lambda i: jnp.zeros(i.shape + (4,))  # noqa: E731
  _, _, sids = se.splice_image(embed, ids, mask, jnp.zeros((2, n, 4)), cfg.tokens.first_img)
  labels = np.asarray(splice_labels(ids, batch["labels"], n, cfg.tokens.first_img))
  assert labels.shape == sids.shape
  has = labels != IGNORE
  np.testing.assert_array_equal(labels[has], np.asarray(sids)[has])
  # the answer's <img_k> tokens are targets; the patches are not
  assert (labels == cfg.tokens.first_img).sum() == 2 and not has[np.asarray(sids) == -1].any()


def test_lm_cross_entropy_is_the_next_token_loss_on_the_labelled_positions():
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
  labels = np.array([[IGNORE, IGNORE, 3, 4, 1], [IGNORE, 6, IGNORE, IGNORE, 2]])
  got = float(lm_cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  terms = [-logp[0, 1, 3], -logp[0, 2, 4], -logp[0, 3, 1], -logp[1, 0, 6], -logp[1, 3, 2]]
  np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)


def test_the_edit_region_weight_weighs_only_where_the_edit_changes_the_image():
  model = rigged_model()
  schedule = make_schedule(beta_schedule="squaredcos_cap_v2", prediction_type="sample")
  cfg = model.config
  null = jnp.zeros((1, cfg.qformer.num_query_tokens, cfg.unet.cross_attention_dim))
  batch = _batch(cfg)

  def diffusion(b, **weight):
    config = SmartEditLossConfig(cond_dropout=0.0, **weight)
    return float(
        smartedit_loss(model, schedule, b, jax.random.key(0), null, config)[1]["diffusion"]
    )

  # An unchanged image has no edit region: the weight is 1 everywhere, the loss the plain MSE.
  same = {**batch, "target_latents": batch["image_latents"]}
  assert diffusion(same, edit_weight=4.0) == pytest.approx(diffusion(same), rel=1e-6)
  # A local edit: its positions weigh 5 times the rest, so the loss moves towards their error.
  local = np.asarray(batch["image_latents"]).copy()
  local[:, 2:5, 2:5] = 0.9
  edited = {**batch, "target_latents": jnp.asarray(local)}
  plain, weighted = diffusion(edited), diffusion(edited, edit_weight=4.0)
  assert weighted != pytest.approx(plain, rel=1e-3)
  # With the estimate's changes weighted too (edit_estimate) and a threshold below every change
  # the untrained model's estimate makes, every position is weighted: the plain MSE again.
  tiny = dict(edit_weight=4.0, edit_threshold=1e-6)
  assert diffusion(edited, **tiny) != pytest.approx(plain, rel=1e-3)
  assert diffusion(edited, edit_estimate=True, **tiny) == pytest.approx(plain, rel=1e-5)


def test_unknown_or_empty_trained_parts_are_refused():
  with pytest.raises(ValueError, match="unknown trained part"):
    trained_filter(["unet", "vae"])
  with pytest.raises(ValueError, match="nothing would be trained"):
    trained_filter([])


def _model_and_trainer(lr):
  """A tiny model, its weights before training, and an Adam trainer of it."""
  model = rigged_model()
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  schedule = make_schedule(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
  cfg = model.config
  null = jnp.zeros((1, cfg.qformer.num_query_tokens, cfg.unet.cross_attention_dim))
  return model, before, SmartEditTrainer(model, schedule, optax.adam(lr), null)


@pytest.fixture(scope="module")
def trained():
  """A tiny model, its weights before, and the metrics of 6 steps on one batch (lr 1e-3)."""
  model, before, trainer = _model_and_trainer(1e-3)
  batch = _batch(model.config)
  metrics = [jax.tree.map(float, trainer.step(batch, jax.random.key(i))) for i in range(6)]
  after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return model, before, after, metrics


def test_the_loss_falls_and_both_terms_are_there(trained):
  _, _, _, metrics = trained
  assert all(np.isfinite(m["loss"]) and m["lm"] > 0 and m["diffusion"] > 0 for m in metrics)
  assert metrics[-1]["loss"] < metrics[0]["loss"]
  np.testing.assert_allclose(metrics[0]["loss"], metrics[0]["lm"] + metrics[0]["diffusion"], 1e-5)


def test_frozen_parts_stay_and_trained_parts_move(trained):
  model, before, after, _ = trained
  moved = lambda *keys: not np.array_equal(_at(before, keys), _at(after, keys))  # noqa: E731
  assert not moved("vision_tower") and not moved("mm_projector")
  q_proj = ("llm", "model", "layers", 0, "self_attn", "q_proj")
  assert not moved(*q_proj, "kernel")  # the LLaMA base weight
  assert moved(*q_proj, "lora_B", "kernel")  # its adapter
  assert moved("unet") and moved("sd_qformer") and moved("bim")
  # only the added tokens' rows of the embedding and lm_head learn
  img = model.config.tokens.img
  emb_b, emb_a = (_at(t, ("llm", "model", "embed_tokens", "embedding")) for t in (before, after))
  np.testing.assert_array_equal(emb_a[:img], emb_b[:img])
  assert not np.array_equal(emb_a[img:], emb_b[img:])
  head_b, head_a = (_at(t, ("llm", "lm_head", "kernel")) for t in (before, after))
  np.testing.assert_array_equal(head_a[:, :img], head_b[:, :img])
  assert not np.array_equal(head_a[:, img:], head_b[:, img:])


def test_accumulated_micro_batches_give_the_update_of_their_mean_gradient():
  """Two micro-batches (accum 2): the update of the mean of their gradients. With the same batch
  twice (fixed noise and timesteps, no dropout) that is one step on the batch, to rounding."""
  batch = _batch(rigged_model().config)
  stacked = jax.tree.map(lambda x: jnp.stack([x, x]), batch)
  results = []
  for accum, b in ((1, batch), (2, stacked)):
    model, _, trainer = _model_and_trainer(1e-3)
    trainer = SmartEditTrainer(
        model,
        trainer.schedule,
        optax.sgd(1.0),  # the update is the gradient itself
        trainer.null_context,
        loss_config=SmartEditLossConfig(cond_dropout=0.0),
        accum=accum,
    )
    m = jax.tree.map(float, trainer.step(b, jax.random.key(0)))
    results.append((m, jax.tree.map(np.asarray, nnx.to_pure_dict(trainer.params))))
  (m1, p1), (m2, p2) = results
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-4)
  with pytest.raises(ValueError, match="accum=0"):
    SmartEditTrainer(model, trainer.schedule, optax.sgd(1.0), trainer.null_context, accum=0)


def _align_batch(model, seed=0):
  cfg = model.config
  rng = np.random.default_rng(seed)
  shape = (2, cfg.qformer.num_query_tokens, cfg.qformer.hidden_size)
  return {
      **_batch(cfg, seed),
      "align_context": jnp.asarray(rng.standard_normal(shape), jnp.float32),
  }


def test_the_alignment_loss_is_the_lm_loss_plus_the_qformer_mse_to_the_clip_context():
  model = rigged_model()
  batch = _align_batch(model)
  loss, parts = smartedit_align_loss(model, batch, SmartEditLossConfig(align_weight=0.5))
  patches = model.image_features(batch["clip_pixels"])
  states = model.teacher_forced(patches, batch["input_ids"], batch["attention_mask"])[0]
  query = np.asarray(model.sd_qformer(states))
  want = np.mean((query - np.asarray(batch["align_context"])) ** 2)
  np.testing.assert_allclose(float(parts["align"]), want, rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(parts["lm"]) + 0.5 * want, rtol=1e-5)
  wrong = {**batch, "align_context": batch["align_context"][:, :3]}
  with pytest.raises(ValueError, match="as many queries as CLIP text tokens"):
    smartedit_align_loss(model, wrong)


def test_the_alignment_term_kept_in_the_smartedit_stage_adds_its_weighted_mse():
  model = rigged_model()
  batch = _align_batch(model)
  schedule = make_schedule(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
  cfg = model.config
  null = jnp.zeros((1, cfg.qformer.num_query_tokens, cfg.unet.cross_attention_dim))
  key = jax.random.key(3)
  plain, plain_parts = smartedit_loss(model, schedule, batch, key, null, SmartEditLossConfig())
  kept, parts = smartedit_loss(
      model, schedule, batch, key, null, SmartEditLossConfig(edit_align_weight=0.25)
  )
  assert "align" not in plain_parts
  _, align_parts = smartedit_align_loss(model, batch)
  np.testing.assert_allclose(float(parts["align"]), float(align_parts["align"]), rtol=1e-6)
  np.testing.assert_allclose(float(parts["diffusion"]), float(plain_parts["diffusion"]), rtol=1e-6)
  np.testing.assert_allclose(
      float(kept), float(plain) + 0.25 * float(align_parts["align"]), rtol=1e-5
  )


def test_alignment_steps_fit_the_qformer_to_the_context_and_leave_the_unet_and_bim():
  model, before, trainer = _model_and_trainer(1e-2)
  batch = _align_batch(model)
  metrics = [
      jax.tree.map(float, trainer.step(batch, jax.random.key(i), align=True)) for i in range(8)
  ]
  assert set(metrics[0]) == {"loss", "lm", "align", "grad_norm"}
  assert metrics[-1]["align"] < 0.8 * metrics[0]["align"]
  after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  moved = lambda *keys: not np.array_equal(_at(before, keys), _at(after, keys))  # noqa: E731
  assert moved("sd_qformer") and moved("llm", "lm_head")
  assert not moved("unet") and not moved("bim")  # no gradient: Adam moves nothing
  # the SmartEdit step afterwards trains them, from the same optimizer state
  trainer.step(_batch(model.config), jax.random.key(9))
  later = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert not np.array_equal(_at(after, ("unet",)), _at(later, ("unet",)))


def _at(tree, keys):
  for k in keys:
    tree = tree[k]
  return (
      np.concatenate([np.ravel(v) for v in jax.tree.leaves(tree)])
      if isinstance(tree, dict)
      else tree
  )
