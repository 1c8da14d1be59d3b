"""Shared layers: which attention kernel is asked for (the choice only; CPU runs XLA's)."""

import jax
import jax.numpy as jnp
import numpy as np

from mre.models.layers import attention, attention_implementation


def test_cudnn_attention_only_on_gpus_in_half_precision_with_its_head_dims(monkeypatch):
  bf16, f32 = jnp.bfloat16, jnp.float32
  assert attention_implementation(bf16, 64, "gpu", "8.0") == "cudnn"
  assert attention_implementation(jnp.float16, 40, "gpu", "8.6") == "cudnn"  # SD 1.5's 320 / 8
  assert attention_implementation(bf16, 160, "gpu", "8.0") is None  # over 128 before Hopper
  assert attention_implementation(bf16, 160, "gpu", "9.0") == "cudnn"
  assert attention_implementation(bf16, 36, "gpu", "9.0") is None  # not a multiple of 8
  assert attention_implementation(f32, 64, "gpu", "9.0") is None  # cuDNN's kernel is 16-bit
  assert attention_implementation(bf16, 64, "cpu") is None
  assert attention_implementation(bf16, 64, "tpu") is None
  monkeypatch.setenv("MRE_ATTENTION", "xla")
  assert attention_implementation(bf16, 64, "gpu", "9.0") is None


def test_attention_on_this_backend_is_jaxs():
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 5, 2, 8)) for i in range(3))
  got = attention(q, k, v, scale=0.3)
  want = jax.nn.dot_product_attention(q, k, v, scale=0.3)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
