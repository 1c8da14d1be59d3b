"""LoRA (low-rank adapters) on the `nnx.Linear` layers of any NNX module tree, as PEFT does it.

`apply_lora(model, LoRAConfig(...), rngs=...)` replaces every Linear whose dotted path ends in one
of `target_modules` (PEFT's list form: `"q_proj"` matches `layers.3.self_attn.q_proj`) by a
`LoRALinear`: y = x W + b + dropout(x) A B * alpha / r, A random (PEFT's Kaiming-uniform), B zero,
so a fresh adapter changes nothing. Dropout acts only after `model.train()` and draws from the
`dropout` RNG stream. `merge(model)` folds A B * alpha / r into W and puts plain Linears back, for
export.

Names: the base weight keeps its name and the adapter weights are `lora_A.weight` / `lora_B.weight`
under it, so the state dict (`mre.model_io.torch_state_dict`) is PEFT's `...q_proj.weight`,
`...q_proj.lora_A.weight`, `...q_proj.lora_B.weight`; `peft_key` reads PEFT's other spellings
(`lora_A.default.weight`, `base_layer.weight`). The adapter weights are `LoRAParam`s (a kind of
`nnx.Param`): `nnx.state(model, LoRAParam)` is what a LoRA fine-tune trains.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


class LoRAParam(nnx.Param):
  """An adapter weight (lora_A or lora_B)."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  r: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  target_modules: tuple = ("q_proj", "v_proj")

  def __post_init__(self):
    if self.r < 1:
      raise ValueError(f"LoRA rank r={self.r} must be >= 1")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout {self.dropout} must be in [0, 1)")
    if isinstance(self.target_modules, str) or not self.target_modules:
      raise ValueError(
          f"LoRA target_modules must be a non-empty list of names: {self.target_modules!r}"
      )
    object.__setattr__(self, "target_modules", tuple(self.target_modules))

  @property
  def scaling(self) -> float:
    return self.alpha / self.r


class LoRAWeight(nnx.Module):
  """One adapter matrix, [in, out] like an nnx.Linear kernel ([out, in] in a PyTorch state dict)."""

  def __init__(self, din, dout, init, *, dtype, param_dtype, rngs):
    self.dtype = dtype
    self.kernel = LoRAParam(init(rngs.params(), (din, dout), param_dtype))

  def __call__(self, x):
    return x @ self.kernel[...].astype(self.dtype or x.dtype)


def _public_fields(module) -> list:
  return [name for name in vars(module) if not name.startswith("_")]


# PEFT's lora_A init: kaiming_uniform_(a=sqrt(5)), i.e. uniform(+-1 / sqrt(fan_in)).
_LORA_A_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class LoRALinear(nnx.Linear):
  """An nnx.Linear (its own kernel and bias, shared with the Linear it replaces) plus an adapter."""

  def __init__(self, base: nnx.Linear, r, alpha, dropout, *, rngs: nnx.Rngs):
    for name in _public_fields(base):  # every field of the Linear: kernel, bias, dtypes, ...
      setattr(self, name, getattr(base, name))
    self.r, self.scaling = r, alpha / r
    kw = dict(dtype=base.dtype, param_dtype=base.param_dtype, rngs=rngs)
    self.lora_A = LoRAWeight(base.in_features, r, _LORA_A_INIT, **kw)
    self.lora_B = LoRAWeight(r, base.out_features, nnx.initializers.zeros, **kw)
    # Off until `model.train()`: inference that forgets `eval()` must not drop out.
    self.lora_dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs)

  def __call__(self, inputs, out_sharding=None):
    y = super().__call__(inputs, out_sharding)
    delta = self.lora_B(self.lora_A(self.lora_dropout(inputs)))
    return y + (delta * self.scaling).astype(y.dtype)

  def merged_kernel(self):
    """W + A B * alpha / r in float32, cast back to the kernel's dtype."""
    a = self.lora_A.kernel[...].astype(jnp.float32)
    b = self.lora_B.kernel[...].astype(jnp.float32)
    w = self.kernel[...]
    return (w.astype(jnp.float32) + (a @ b) * self.scaling).astype(w.dtype)


def _dotted(path) -> str:
  return ".".join(str(p) for p in path)


def _matched(name: str, targets) -> list:
  """The targets a module name matches (PEFT's list form: the whole name or its last parts)."""
  return [t for t in targets if name == t or name.endswith("." + t)]


def _modules(model, kind):
  """(path, module) of every `kind` module in the tree, collected before anything is replaced."""
  return [
      (path, node)
      for path, node in nnx.iter_graph(model)
      if isinstance(node, kind) and not any(str(p).startswith("_") for p in path)
  ]


def _replace(model, path, new):
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  if isinstance(path[-1], int):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


def apply_lora(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs) -> list[str]:
  """Wraps the target Linears of `model` in place; returns their dotted names (sorted).

  Refuses a target that matches nothing, a match that is not an nnx.Linear, and a Linear that
  already has an adapter."""
  targets, found = [], set()
  for path, node in _modules(model, nnx.Module):
    hit = _matched(_dotted(path), config.target_modules) if path else []
    if not hit:
      continue
    found.update(hit)
    if isinstance(node, LoRALinear):
      raise ValueError(f"LoRA: {_dotted(path)} already has an adapter")
    if not isinstance(node, nnx.Linear):
      raise ValueError(
          f"LoRA: target {_dotted(path)} is a {type(node).__name__}, not an nnx.Linear"
      )
    targets.append((path, node))
  missing = [t for t in config.target_modules if t not in found]
  if missing:
    raise ValueError(f"LoRA: target module(s) {missing} match no module of the model")
  for path, base in targets:
    _replace(model, path, LoRALinear(base, config.r, config.alpha, config.dropout, rngs=rngs))
  return sorted(_dotted(path) for path, _ in targets)


def lora_modules(model: nnx.Module) -> list[str]:
  """Dotted names of the Linears that carry an adapter."""
  return sorted(_dotted(path) for path, _ in _modules(model, LoRALinear))


def merge(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its base kernel and puts a plain nnx.Linear back (in place); the
  model then has the base model's parameter names and computes what the adapted model computed
  (with dropout off)."""
  for path, lora in _modules(model, LoRALinear):
    shell = nnx.eval_shape(
        lambda lin=lora: nnx.Linear(
            lin.in_features,
            lin.out_features,
            use_bias=lin.use_bias,
            dtype=lin.dtype,
            param_dtype=lin.param_dtype,
            rngs=nnx.Rngs(0),
        )
    )
    for name in _public_fields(shell):  # the very kernel/bias Variables, and every setting
      setattr(shell, name, getattr(lora, name))
    merged = lora.merged_kernel()
    sharding = getattr(lora.kernel.get_value(), "sharding", None)
    shell.kernel.set_value(jax.device_put(merged, sharding) if sharding is not None else merged)
    _replace(model, path, shell)
  return model


def peft_key(name: str) -> str:
  """A PEFT state-dict name in the spelling our modules have: the adapter name is dropped
  (`q_proj.lora_A.default.weight` -> `q_proj.lora_A.weight`, as PEFT's saved adapters spell it)
  and so is PEFT >= 0.7's `base_layer` (`q_proj.base_layer.weight` -> `q_proj.weight`)."""
  parts = name.split(".")
  out = []
  i = 0
  while i < len(parts):
    part = parts[i]
    if part == "base_layer":
      i += 1
      continue
    out.append(part)
    if part in ("lora_A", "lora_B") and i + 2 < len(parts) and parts[i + 2] == "weight":
      i += 2  # skip the adapter name
      continue
    i += 1
  return ".".join(out)
