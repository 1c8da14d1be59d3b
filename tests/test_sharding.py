"""Mesh construction and the FSDP parameter rules."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mre import sharding


def test_param_spec_shards_the_largest_divisible_dim_of_large_arrays():
  assert sharding.param_spec((3, 3, 320, 640), 4, 1000) == P(None, None, None, "fsdp")
  assert sharding.param_spec((1280, 7), 4, 1000) == P("fsdp", None)
  assert sharding.param_spec((7, 5), 4, 1) == P()  # nothing divides
  assert sharding.param_spec((320,), 4, 1000) == P()  # too small
  assert sharding.param_spec((4096, 4096), 1, 0) == P()  # no fsdp axis


def test_make_mesh_fills_and_checks():
  mesh = sharding.make_mesh(-1, 1)
  assert mesh.shape == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="at most one mesh axis"):
    sharding.make_mesh(-1, -1)
  with pytest.raises(ValueError, match="at most one mesh axis"):
    sharding.make_mesh(-1, 1, -1)
  with pytest.raises(ValueError, match="does not divide"):
    sharding.make_mesh(-1, jax.device_count() + 1)


def test_global_batch_keeps_values():
  mesh = sharding.make_mesh(-1, 1)
  local = {"x": np.arange(2 * jax.device_count() * 3, dtype=np.float32).reshape(2, -1, 3)}
  out = sharding.global_batch(mesh, local, leading_unsharded=1)
  np.testing.assert_array_equal(np.asarray(out["x"]), local["x"])


def test_tensor_axis_splits_attention_heads_and_mlp_columns():
  assert sharding.tensor_dim(("layers", 0, "self_attn", "q_proj", "kernel")) == 1
  assert sharding.tensor_dim(("layers", 0, "self_attn", "o_proj", "kernel")) == 0
  assert sharding.tensor_dim(("layers", 0, "mlp", "down_proj", "kernel")) == 0
  assert sharding.tensor_dim(("layers", 0, "self_attn", "v_proj", "lora_B", "kernel")) == 1
  assert sharding.tensor_dim(("layers", 0, "self_attn", "v_proj", "lora_A", "kernel")) is None
  assert sharding.tensor_dim(("layers", 0, "self_attn", "q_proj", "bias")) is None
  assert sharding.tensor_dim(("embed_tokens", "embedding")) is None
  # heads over "tensor", then the largest other dimension over "fsdp"
  assert sharding.param_spec((4096, 4096), 4, 1000, 2, 1) == P("fsdp", "tensor")
  assert sharding.param_spec((11008, 4096), 4, 1000, 2, 0) == P("tensor", "fsdp")
  assert sharding.param_spec((4096, 4096), 1, 1000, 2, 1) == P(None, "tensor")
  assert sharding.param_spec((4096, 30), 4, 1000, 4, 1) == P("fsdp", None)  # 30 heads / 4: no


_SHARDED_LLAMA = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from mre import sharding
from mre.models.llama import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)
model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 7)))
want = np.asarray(model(ids).logits)
mesh = sharding.make_mesh(1, 4, 2)
graphdef, state = nnx.split(model)
shardings = sharding.tree_shardings(mesh, state, 0)
specs = {"/".join(map(str, p)): s.spec for p, s in nnx.to_flat_state(shardings)}
assert specs["model/layers/0/self_attn/q_proj/kernel"] == jax.sharding.PartitionSpec("fsdp", "tensor")
assert specs["model/layers/0/mlp/down_proj/kernel"] == jax.sharding.PartitionSpec("tensor", "fsdp")
state = jax.device_put(state, shardings)
got = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i).logits)(state, ids)
np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
print("ok")
"""


def test_an_llm_sharded_over_fsdp_and_tensor_computes_the_same_logits(tmp_path):
  """On 8 host devices (a fresh process): a (1, 4, 2) mesh, q/k/v/gate/up split by output and
  o/down by input over "tensor"; the sharded forward equals the unsharded one."""
  import os
  import subprocess
  import sys

  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  script = tmp_path / "sharded_llama.py"
  script.write_text(_SHARDED_LLAMA)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  result = subprocess.run(
      [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
