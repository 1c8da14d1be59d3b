"""LoRA on a tiny NNX module: a fresh adapter changes nothing, merged equals unmerged, dropout only
in training, PEFT's state-dict names (and their other spellings) load and export unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mre.model_io.safetensors_io import WeightsError
from mre.model_io.torch_state_dict import load_state_dict, state_dict
from mre.models.lora import (
    LoRAConfig,
    LoRALinear,
    LoRAParam,
    apply_lora,
    lora_modules,
    merge,
    peft_key,
)

D = 16
CFG = LoRAConfig(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))


class Attention(nnx.Module):

  def __init__(self, rngs):
    self.q_proj = nnx.Linear(D, D, rngs=rngs)
    self.k_proj = nnx.Linear(D, D, rngs=rngs)
    self.v_proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)
    self.norm = nnx.LayerNorm(D, rngs=rngs)

  def __call__(self, x):
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    w = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / D**0.5, axis=-1)
    return self.norm(x + w @ v)


class Tiny(nnx.Module):

  def __init__(self, rngs):
    self.layers = nnx.List([Attention(rngs) for _ in range(2)])
    self.head = nnx.Linear(D, 3, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return self.head(x)


def _x(seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(2, 5, D), jnp.float32)


def _adapted(cfg=CFG, seed=1):
  model = Tiny(nnx.Rngs(0))
  apply_lora(model, cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 100))
  return model


def _randomize_b(model, seed=2, scale=0.3):
  """Trained adapters: B away from its zero init."""
  for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, LoRAParam))):
    if var.shape[0] == CFG.r:  # lora_B kernels are [r, out]
      var.set_value(scale * jax.random.normal(jax.random.key(seed + i), var.shape))


def test_targets_by_name_and_zero_b_leaves_the_model_unchanged():
  model = Tiny(nnx.Rngs(0))
  before = model(_x())
  names = apply_lora(model, CFG, rngs=nnx.Rngs(1))
  assert names == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]
  assert lora_modules(model) == names
  assert isinstance(model.layers[0].q_proj, LoRALinear)
  assert not isinstance(model.layers[0].k_proj, LoRALinear)
  a = model.layers[0].q_proj.lora_A.kernel[...]
  assert float(jnp.abs(a).max()) > 0 and float(jnp.abs(a).max()) <= 1 / D**0.5  # PEFT's bound
  assert not bool(jnp.any(model.layers[0].q_proj.lora_B.kernel[...]))
  np.testing.assert_array_equal(np.asarray(model(_x())), np.asarray(before))


def test_merged_equals_unmerged():
  model = _adapted()
  _randomize_b(model)
  base_names = sorted(state_dict(Tiny(nnx.Rngs(0))))
  unmerged = nnx.jit(lambda m, x: m(x))(model, _x())
  assert float(jnp.abs(unmerged - Tiny(nnx.Rngs(0))(_x())).max()) > 1e-2  # the adapters act
  merge(model)
  assert lora_modules(model) == [] and type(model.layers[1].v_proj) is nnx.Linear
  assert sorted(state_dict(model)) == base_names  # export has the base model's names
  merged = nnx.jit(lambda m, x: m(x))(model, _x())
  np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=1e-5, rtol=0)


def test_dropout_only_in_training():
  model = _adapted(LoRAConfig(r=4, alpha=8.0, dropout=0.5))
  _randomize_b(model)
  plain = _adapted(LoRAConfig(r=4, alpha=8.0, dropout=0.0))  # same weights, no dropout
  _randomize_b(plain)
  step = nnx.jit(lambda m, x: m(x))
  evaluated = step(model, _x())
  np.testing.assert_array_equal(np.asarray(evaluated), np.asarray(step(plain, _x())))
  model.train()
  first, second = step(model, _x()), step(model, _x())
  assert float(jnp.abs(first - evaluated).max()) > 1e-3  # dropped out
  assert float(jnp.abs(first - second).max()) > 1e-3  # a new mask each call
  nnx.reseed(model, dropout=7)
  again = step(model, _x())
  nnx.reseed(model, dropout=7)
  np.testing.assert_array_equal(np.asarray(step(model, _x())), np.asarray(again))  # seeded
  model.eval()
  np.testing.assert_array_equal(np.asarray(step(model, _x())), np.asarray(evaluated))


def test_only_b_gets_gradient_at_init():
  """PEFT's init: with B = 0 the gradient reaches B, not A; the adapters are `LoRAParam`s."""
  model = _adapted()
  grads = nnx.grad(lambda m: jnp.sum(m(_x()) ** 2), argnums=nnx.DiffState(0, LoRAParam))(model)
  flat = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(grads)}
  assert len(flat) == 8
  for name, g in flat.items():
    assert bool(jnp.any(g)) == (".lora_B." in name), name


def _peft_state(seed=3):
  """A PEFT-layout state dict (PyTorch [out, in] layout) of the tiny model, built by hand."""
  rs = np.random.RandomState(seed)
  out = {}
  for i in range(2):
    for proj in ("q_proj", "k_proj", "v_proj"):
      p = f"layers.{i}.{proj}"
      out[f"{p}.weight"] = rs.randn(D, D).astype(np.float32) * 0.2
      if proj != "v_proj":
        out[f"{p}.bias"] = rs.randn(D).astype(np.float32) * 0.1
      if proj != "k_proj":
        out[f"{p}.lora_A.weight"] = rs.randn(CFG.r, D).astype(np.float32) * 0.2
        out[f"{p}.lora_B.weight"] = rs.randn(D, CFG.r).astype(np.float32) * 0.2
    out[f"layers.{i}.norm.weight"] = 1 + rs.randn(D).astype(np.float32) * 0.1
    out[f"layers.{i}.norm.bias"] = rs.randn(D).astype(np.float32) * 0.1
  out["head.weight"] = rs.randn(3, D).astype(np.float32) * 0.2
  out["head.bias"] = rs.randn(3).astype(np.float32) * 0.1
  return out


def _respell(tensors, style):
  """PEFT's other spellings: the full model's state dict keeps the adapter name (`default`);
  PEFT >= 0.7 also moves the base weight under `base_layer`."""
  out = {}
  for k, v in tensors.items():
    head, leaf = k.rsplit(".", 1)
    if ".lora_" in k:
      k = f"{head}.default.{leaf}"
    elif style == "base_layer" and head.endswith(("q_proj", "v_proj")):
      k = f"{head}.base_layer.{leaf}"
    out[k] = v
  return out


@pytest.mark.parametrize("style", ["saved_adapter", "default", "base_layer"])
def test_peft_names_round_trip(style):
  tensors = _peft_state()
  given = tensors if style == "saved_adapter" else _respell(tensors, style)
  model = _adapted()
  load_state_dict(model, given, where="LoRA test", rename=peft_key)
  exported = state_dict(model)
  assert sorted(exported) == sorted(tensors)
  for name, arr in tensors.items():
    assert exported[name].tobytes() == arr.tobytes(), name
  # PEFT's formula in numpy on the first layer's q_proj: x W^T + b + x A^T B^T alpha / r.
  x = np.asarray(_x()).reshape(-1, D)
  p = "layers.0.q_proj"
  want = x @ tensors[f"{p}.weight"].T + tensors[f"{p}.bias"]
  want += x @ tensors[f"{p}.lora_A.weight"].T @ tensors[f"{p}.lora_B.weight"].T * CFG.scaling
  got = np.asarray(model.layers[0].q_proj(jnp.asarray(x)))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_peft_key_spellings():
  assert peft_key("model.layers.0.self_attn.q_proj.lora_A.default.weight") == (
      "model.layers.0.self_attn.q_proj.lora_A.weight"
  )
  assert peft_key("model.layers.0.self_attn.v_proj.base_layer.weight") == (
      "model.layers.0.self_attn.v_proj.weight"
  )
  for same in ("x.q_proj.lora_B.weight", "x.q_proj.weight", "lm_head.weight"):
    assert peft_key(same) == same


def test_missing_adapter_weights_are_named():
  tensors = _peft_state()
  del tensors["layers.1.v_proj.lora_B.weight"]
  with pytest.raises(WeightsError, match=r"layers\.1\.v_proj\.lora_B\.weight"):
    load_state_dict(_adapted(), tensors, where="LoRA test")


def test_bad_targets_are_refused():
  with pytest.raises(ValueError, match="o_proj"):
    apply_lora(Tiny(nnx.Rngs(0)), LoRAConfig(target_modules=("q_proj", "o_proj")), rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="LayerNorm"):
    apply_lora(Tiny(nnx.Rngs(0)), LoRAConfig(target_modules=("norm",)), rngs=nnx.Rngs(1))
  model = _adapted()
  with pytest.raises(ValueError, match="already has an adapter"):
    apply_lora(model, CFG, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="rank"):
    LoRAConfig(r=0)
