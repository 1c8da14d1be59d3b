"""The SmartEdit-style editor on a tiny random model (tests/smartedit_fixtures.py: tiny LLaMA, ViT,
Q-Former, BIM, U-Net): prompt ids, conditioning shapes, teacher-forced states == generated states,
the zero-initialised BIM heads at init, an edit end to end with three-branch guidance, the 7B dry
run's parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mre.models import smartedit as se
from mre.models.pixel import PixelSpace
from mre.models.smartedit_prompt import IGNORE, TokenIds, conversation, prompt_batch, tokenize
from mre.smartedit_editor import SmartEditor, SmartEditPipeline, SmartEditSettings
from tests.smartedit_fixtures import TEMPLATE, encode, rigged_model


@pytest.fixture(scope="module")
def model():
  return rigged_model()


def test_prompt_ids_and_added_tokens():
  ids = TokenIds()
  added = ids.added()
  assert (added["<img>"], added["<im_start>"], added["<im_end>"]) == (32000, 32001, 32002)
  assert added["<img_0>"] == 32003 and added["<img_31>"] == 32034 and ids.vocab_size == 32035
  text = conversation("make it red", answer=True)
  assert '"<im_start> <img_0> <im_end>make it red"' in text and text.endswith("<img_31></s>")
  assert "USER: " in text and " ASSISTANT: Certainly" in text
  row = tokenize(text, encode)
  assert row[0] == 1 and row[-1] == 2 and row[-33:-1] == list(range(32003, 32035))
  assert row.count(32003) == 2 and row.count(32001) == 1
  gen = prompt_batch(["red", "make it blue"], encode, answer=False)
  assert gen.attention_mask[:, -1].all() and not gen.attention_mask[0, 0]  # left-padded
  train = prompt_batch(["red", "make it blue"], encode, answer=True)
  assert train.attention_mask[:, 0].all()  # right-padded
  real = train.labels[1][train.labels[1] != IGNORE]
  assert list(real[-33:]) == list(range(32003, 32035)) + [2]


def test_teacher_forced_states_equal_generated_states(model):
  cfg = model.config
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  instructions = ["make it red", "turn the sky into a starry night"]
  patches = nnx.jit(lambda m, x: m.image_features(se.clip_pixels(x, 16)))(model, images)
  assert patches.shape == (2, cfg.num_patches, cfg.vision.hidden_size)
  tf = prompt_batch(instructions, encode, answer=True, ids=cfg.tokens, template=TEMPLATE)
  states, logits, sids, count = nnx.jit(lambda m, *a: m.teacher_forced(*a))(
      model, patches, jnp.asarray(tf.input_ids), jnp.asarray(tf.attention_mask)
  )
  assert states.shape == (2, cfg.tokens.num_img, cfg.llm.hidden_size)
  assert logits.shape == (2, tf.input_ids.shape[1] - 1 + cfg.num_patches, cfg.llm.vocab_size)
  assert list(np.asarray(count)) == [cfg.tokens.num_img] * 2 and (sids == -1).sum() == 2 * 16
  gen = prompt_batch(instructions, encode, answer=False, ids=cfg.tokens, template=TEMPLATE)
  generated, tokens, gcount = nnx.jit(
      lambda m, *a: m.generated(*a, max_new_tokens=8, temperature=0.0)
  )(model, patches, jnp.asarray(gen.input_ids), jnp.asarray(gen.attention_mask))
  img = list(range(cfg.tokens.first_img, cfg.tokens.vocab_size))
  assert [list(r[: cfg.tokens.num_img]) for r in np.asarray(tokens)] == [img, img]
  assert (np.asarray(tokens)[:, cfg.tokens.num_img :] == 0).all()  # stopped at the last <img_k>
  np.testing.assert_allclose(generated, states, atol=2e-4, rtol=2e-4)
  # The zero-initialised BIM heads: context = Q-Former output, no conv_in change; the U-Net
  # then computes what a plain U-Net with that context computes.
  context, residual = nnx.jit(lambda m, s, p: m.condition(s, p, (16, 16)))(model, states, patches)
  qformer_out = model.sd_qformer(states)
  assert context.shape == (2, cfg.qformer.num_query_tokens, cfg.qformer.hidden_size)
  assert residual.shape == (2, 16, 16, cfg.unet.block_out_channels[0])
  np.testing.assert_array_equal(residual, 0)
  np.testing.assert_allclose(context, qformer_out, atol=1e-6)
  sample = jax.random.normal(jax.random.key(2), (2, 16, 16, cfg.unet.in_channels))
  conditioned = se.ConditionedUNet(model.unet)(sample, 10, context, conv_in_residual=residual)
  np.testing.assert_allclose(conditioned, model.unet(sample, 10, qformer_out), atol=1e-5)


def test_an_edit_runs_end_to_end_with_three_branch_guidance(model):
  cfg = model.config
  pipe = SmartEditPipeline(
      model=model,
      vae=PixelSpace(),
      null_context=np.zeros((1, cfg.qformer.num_query_tokens, cfg.qformer.hidden_size), np.float32),
      encode=encode,
      scheduler_config={"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"},
      template=TEMPLATE,
  )
  settings = SmartEditSettings(steps=2, sampler="ddim", temperature=0.0, max_new_tokens=8)
  editor = SmartEditor(pipe, settings)
  images = np.asarray(jax.random.uniform(jax.random.key(3), (2, 16, 16, 3), minval=-1, maxval=1))
  out = editor.edit_arrays(images, ["make it red", "add a hat"])
  assert out.shape == images.shape and np.isfinite(out).all()
  with pytest.raises(ValueError, match="non-empty instruction"):
    editor.edit_arrays(images, ["make it red", " "])


def test_7b_dry_run_counts_the_known_sizes():
  from configs import smartedit as recipe
  from mre.smartedit_dryrun import estimate

  sizes = estimate(recipe.get_config(), fsdp=8)
  d, f, v, layers = 4096, 11008, 32035, 32
  llava_7b = 2 * v * d + layers * (4 * d * d + 3 * d * f + 2 * d) + d  # 6,738,702,336
  lora = layers * 2 * (d * 8 + 8 * d)
  assert sizes["llm"].params == llava_7b + lora
  assert sizes["llm"].trained == lora + 2 * v * d  # adapters + embedding and lm_head matrices
  assert sizes["vision_tower"].params == 303_179_776  # CLIP ViT-L/14 at 224 px
  assert sizes["mm_projector"].params == 1024 * d + d
  h, ffn = 768, 3072
  qformer = 77 * h + 2 * h + 6 * (4 * (h * h + h) + 2 * h + h * ffn + ffn + ffn * h + h + 2 * h)
  qformer += 3 * (2 * (h * h + h) + 2 * (d * h + h) + 2 * h)  # cross-attention on layers 0, 2, 4
  assert sizes["sd_qformer"].params == qformer
  w, m = 1024, 2048
  attn, down = 4 * (w * w + w), 3 * (w * 512 + 512) + 512 * w + w
  block = attn + 2 * down + (w * m + m + m * w + w) + 4 * 2 * w
  bim = (h * w + w) + 2 * block + down + 2 * w + (w * 320 + 320) + (w * h + h)
  assert sizes["bim"].params == bim
  # SD 1.5's U-Net (859,520,964) with conv_in widened to 8 channels: exact, well within 0.01%.
  assert sizes["unet"].params == 859_520_964 + 4 * 320 * 9
  assert abs(sizes["unet"].params - 859.5e6) / 859.5e6 < 1e-4
  total = sum(s.device_bytes for s in sizes.values())
  assert 4 * 2**30 < total < 8 * 2**30  # ~5.6 GiB per device before activations
  # The frozen VAE is replicated by the trainer: whole on every device, whatever the mesh.
  assert sizes["vae"].device_bytes == 4 * sizes["vae"].params
  assert estimate(recipe.get_config(), fsdp=2)["vae"].device_bytes == sizes["vae"].device_bytes


def test_the_trainer_refuses_the_release_sizes_without_a_folder_with_a_message():
  """The toy trains (tests/test_smartedit_train.py), the 7B from a SmartEdit folder
  (tests/test_smartedit_release_train.py); without one the 7B recipe is refused before anything
  loads, with a message, not a stack trace."""
  import os
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  r = subprocess.run(
      [sys.executable, "-m", "mre.train", "--config=configs/smartedit.py"],
      cwd=root,
      capture_output=True,
      text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
      timeout=300,
  )
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert (
      "the release-size SmartEdit (model.smartedit.size='7b') trains from a SmartEdit" in r.stderr
  )
  assert "set model.pretrained" in r.stderr
  assert "smartedit_dryrun" in r.stderr and "configs/smartedit.py:toy" in r.stderr


def test_dry_run_with_a_tensor_axis_splits_the_llm_projections():
  """configs/smartedit.py:toy (nothing large enough for fsdp): a tensor axis of 2 halves the
  per-device bytes of the LLM's attention and MLP projections and leaves the counts alone."""
  from configs import smartedit as recipe
  from mre.smartedit_dryrun import estimate

  config = recipe.get_config("toy")
  one, two = estimate(config, fsdp=1, tensor=1), estimate(config, fsdp=1, tensor=2)
  assert two["llm"].params == one["llm"].params and two["llm"].trained == one["llm"].trained
  assert two["llm"].device_bytes < one["llm"].device_bytes
  assert two["unet"].device_bytes == one["unet"].device_bytes  # its attention is not split
