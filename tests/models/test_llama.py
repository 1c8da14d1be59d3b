"""LLaMA decoder parity with transformers' LlamaForCausalLM (tiny random GQA config, fp32): logits
with and without the KV cache, greedy generation, temperature sampling, weights in and out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mre.model_io.llama_weights import (
    llama_from_state_dict,
    llama_state_dict,
    load_llama,
    save_llama,
)
from mre.model_io.safetensors_io import WeightsError
from mre.models.config import ConfigError
from mre.models.llama import (
    LlamaConfig,
    LlamaForCausalLM,
    generate,
    rope_frequencies,
    sample_logits,
)
from tests.reference import randomize, torch

# Grouped-query attention (4 query heads share 2 key/value heads) and a rope_theta of its own.
LLAMA_CONFIG = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
T, NEW, EOS, PAD = 10, 8, 2, 0


@pytest.fixture(scope="module")
def models():
  from transformers import LlamaConfig as TorchConfig, LlamaForCausalLM as TorchLlama

  torch.manual_seed(0)
  ref = randomize(TorchLlama(TorchConfig(**LLAMA_CONFIG)), 3, scale=0.1)
  tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
  return ref, llama_from_state_dict(ref.config.to_dict(), tensors)


def _batch():
  """Row 0 full, row 1 left-padded, row 2 right-padded."""
  ids = np.random.RandomState(0).randint(3, 64, (3, T))
  mask = np.ones((3, T), np.int64)
  mask[1, :3] = 0
  mask[2, 6:] = 0
  return np.where(mask, ids, PAD), mask


def _positions(mask):
  return np.maximum(mask.cumsum(-1) - 1, 0)  # what transformers' generate passes


def _reference(ref, ids, mask):
  args = dict(attention_mask=torch.tensor(mask), position_ids=torch.tensor(_positions(mask)))
  with torch.no_grad():
    logits = ref(torch.tensor(ids), **args).logits.numpy()
    hidden = ref.model(torch.tensor(ids), **args).last_hidden_state.numpy()
  return logits, hidden


_forward = nnx.jit(lambda m, ids, mask: m(ids, mask)[:2])
_step = nnx.jit(lambda m, ids, mask, cache: m(ids, mask, cache=cache))


def test_logits_match_transformers_left_and_right_padded(models):
  ref, ours = models
  ids, mask = _batch()
  want_logits, want_hidden = _reference(ref, ids, mask)
  logits, hidden = _forward(ours, ids, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[real], want_logits[real], atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(hidden)[real], want_hidden[real], atol=1e-4, rtol=0)


def test_kv_cache_steps_equal_full_logits(models):
  """A 6-token prefill then single tokens, through a cache of exactly T slots."""
  ref, ours = models
  ids, mask = _batch()
  want, _ = _reference(ref, ids, mask)
  full = np.asarray(_forward(ours, ids, mask)[0])
  cache = ours.init_cache(3, T)
  out = _step(ours, ids[:, :6], mask[:, :6], cache)
  got, cache = [np.asarray(out.logits)], out.cache
  for i in range(6, T):
    out = _step(ours, ids[:, i : i + 1], mask[:, i : i + 1], cache)
    got.append(np.asarray(out.logits))
    cache = out.cache
  got = np.concatenate(got, axis=1)
  assert int(cache.index) == T and np.array_equal(np.asarray(cache.valid), mask.astype(bool))
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], full[real], atol=1e-5, rtol=0)
  np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


def _prompts():
  """Left-padded prompts of lengths 10, 7 and 4."""
  ids = np.random.RandomState(1).randint(3, 64, (3, T))
  mask = np.ones((3, T), np.int64)
  mask[1, :3] = 0
  mask[2, :6] = 0
  return np.where(mask, ids, PAD), mask


def test_greedy_generation_matches_transformers(models):
  ref, ours = models
  ids, mask = _prompts()
  with torch.no_grad():
    seq = ref.generate(
        torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        do_sample=False,
        max_new_tokens=NEW,
        eos_token_id=EOS,
        pad_token_id=PAD,
    ).numpy()
  want = np.full((3, NEW), PAD)
  want[:, : seq.shape[1] - T] = seq[:, T:]
  out = generate(ours, ids, mask, max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  np.testing.assert_array_equal(tokens, want)
  # The seed is chosen so that the end-of-sequence stop is exercised: some rows end early.
  ended = (want == EOS).any(-1)
  assert ended.any() and not ended.all(), want
  np.testing.assert_array_equal(
      lengths, [list(r).index(EOS) + 1 if EOS in r else NEW for r in want]
  )
  # Hidden states at generated positions are teacher forcing's: a full transformers forward over
  # prompt + generated tokens, at the positions of the generated ones.
  gen_mask = np.arange(NEW)[None] < lengths[:, None]
  full_mask = np.concatenate([mask, gen_mask.astype(np.int64)], axis=1)
  _, hidden = _reference(ref, np.concatenate([ids, tokens], axis=1), full_mask)
  states = np.asarray(out.hidden_states)
  np.testing.assert_allclose(states[gen_mask], hidden[:, T:][gen_mask], atol=1e-4, rtol=0)
  assert not states[~gen_mask].any()
  # A prompt given as embeddings (how image features are spliced in) generates the same.
  embeds = np.asarray(ours.model.embed_tokens(jnp.asarray(ids)))
  again = generate(
      ours, None, mask, inputs_embeds=embeds, max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD
  )
  np.testing.assert_array_equal(np.asarray(again.tokens), tokens)


def test_temperature_sampling_is_reproducible_and_differs_from_greedy(models):
  _, ours = models
  ids, mask = _prompts()
  run = lambda temperature, seed: np.asarray(
      generate(
          ours,
          ids,
          mask,
          max_new_tokens=NEW,
          eos_token_id=EOS,
          pad_token_id=PAD,
          temperature=temperature,
          key=jax.random.key(seed),
      ).tokens
  )
  greedy = run(0.0, 0)
  a, b, c = run(1.0, 1), run(1.0, 1), run(1.0, 2)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any() and (a != greedy).any()
  np.testing.assert_array_equal(run(1e-4, 3), greedy)  # a near-zero temperature is the argmax


def test_sampling_draws_from_the_tempered_softmax():
  logits = jnp.asarray([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
  keys = jax.random.split(jax.random.key(0), 20000)
  draw = jax.jit(jax.vmap(sample_logits, in_axes=(None, None, 0)))
  for temperature in (0.7, 1.5):
    counts = np.bincount(np.asarray(draw(logits, temperature, keys)), minlength=6)
    want = np.asarray(jax.nn.softmax(logits / temperature))
    np.testing.assert_allclose(counts / len(keys), want, atol=0.015)
  assert set(np.asarray(draw(logits, 0.0, keys[:10])).tolist()) == {0}


def test_generation_refuses_right_padded_prompts(models):
  _, ours = models
  ids, mask = _batch()
  with pytest.raises(ValueError, match=r"left-padded.*\[2\]"):
    generate(ours, ids, mask, max_new_tokens=NEW, eos_token_id=EOS)


def test_weights_round_trip_byte_identical(models, tmp_path):
  from transformers import LlamaForCausalLM as TorchLlama

  ref, ours = models
  given = {k: v.numpy() for k, v in ref.state_dict().items()}
  exported = llama_state_dict(ours)
  assert sorted(exported) == sorted(given)
  for k, v in given.items():
    assert exported[k].dtype == v.dtype and exported[k].shape == v.shape, k
    assert exported[k].tobytes() == v.tobytes(), k
  again = llama_state_dict(llama_from_state_dict(ours.config.raw, exported))
  assert all(again[k].tobytes() == v.tobytes() for k, v in given.items())
  # A folder that transformers opens, and that we read back.
  save_llama(ours, str(tmp_path / "llama"))
  back = TorchLlama.from_pretrained(str(tmp_path / "llama")).state_dict()
  assert all(back[k].numpy().tobytes() == v.tobytes() for k, v in given.items())
  mine = llama_state_dict(load_llama(str(tmp_path / "llama")))
  assert all(mine[k].tobytes() == v.tobytes() for k, v in given.items())


def test_weights_errors_name_every_tensor(models):
  _, ours = models
  tensors = llama_state_dict(ours)
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(4, np.float32)  # skipped
  del tensors["model.layers.1.mlp.up_proj.weight"]
  tensors["model.layers.2.mlp.up_proj.weight"] = np.zeros((48, 32), np.float32)
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)  # MHA-sized
  with pytest.raises(WeightsError) as err:
    llama_from_state_dict(ours.config.raw, tensors)
  msg = str(err.value)
  assert "missing tensors: model.layers.1.mlp.up_proj.weight" in msg
  assert "unexpected tensors: model.layers.2.mlp.up_proj.weight" in msg
  assert "model.layers.0.self_attn.k_proj.weight has shape (32, 32)" in msg and "(16, 32)" in msg
  assert "inv_freq" not in msg


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(tie_word_embeddings=True), "tie_word_embeddings"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(model_type="mistral"), "model_type"),
    ],
)
def test_unsupported_config_is_refused_by_name(change, key):
  with pytest.raises(ConfigError, match=key):
    LlamaConfig.from_dict({**LLAMA_CONFIG, **change})


def test_config_reads_legacy_and_llama3_rope():
  from transformers import LlamaConfig as TorchConfig
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  legacy = {k: v for k, v in LLAMA_CONFIG.items() if k != "rope_parameters"}
  cfg = LlamaConfig.from_dict({**legacy, "rope_theta": 123.0, "rope_scaling": None})
  assert cfg.rope_theta == 123.0 and cfg.head_dim == 8 and cfg.num_key_value_heads == 2
  rope = dict(
      rope_type="llama3",
      rope_theta=500000.0,
      factor=8.0,
      low_freq_factor=1.0,
      high_freq_factor=4.0,
      original_max_position_embeddings=16,
  )
  config = {**legacy, "hidden_size": 256, "rope_parameters": rope}  # head_dim 64: all three bands
  want, _ = ROPE_INIT_FUNCTIONS["llama3"](TorchConfig(**config))
  np.testing.assert_allclose(rope_frequencies(LlamaConfig.from_dict(config)), want, rtol=1e-6)


def test_bf16_compute_keeps_fp32_params_and_remat_keeps_gradients():
  full = LlamaForCausalLM(LLAMA_CONFIG, rngs=nnx.Rngs(0))
  half = LlamaForCausalLM(LLAMA_CONFIG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(half, nnx.Param)))
  ids, mask = _batch()
  a, b = _forward(full, ids, mask)[0], nnx.jit(lambda m, i, k: m(i, k).logits)(half, ids, mask)
  assert b.dtype == jnp.bfloat16
  assert np.abs(np.asarray(a) - np.asarray(b, np.float32)).max() < 0.05 * np.abs(a).max()
  loss = lambda m: jnp.mean(m(ids, mask).logits ** 2)
  grad = nnx.jit(nnx.grad(loss))
  g_remat = grad(LlamaForCausalLM(LLAMA_CONFIG, remat=("layer",), rngs=nnx.Rngs(0)))
  for u, v in zip(jax.tree.leaves(grad(full)), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=1e-6)
  with pytest.raises(ValueError, match="remat"):
    LlamaForCausalLM(LLAMA_CONFIG, remat=("mlp",), rngs=nnx.Rngs(0))
