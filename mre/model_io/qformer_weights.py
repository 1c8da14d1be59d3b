"""Q-Former weights in two layouts: transformers' and LAVIS' (the SmartEdit release's).

"transformers": `Blip2Model`'s names, `query_tokens` and `qformer.*`; a bare `Blip2QFormerModel`
state dict (no `qformer.` prefix) plus `query_tokens` loads too. "lavis": LAVIS' BERT `BertModel`
without its text embeddings or text feed-forward, as SmartEdit's `embeddings_qformer` file holds it
(`sd_query_tokens`, `sd_qformer.*`). The same tensors, renamed:

  lavis                                         transformers
  embeddings.LayerNorm.*                        layernorm.*
  encoder.layer.i.attention.self.{query,..}     encoder.layer.i.attention.attention.{query,..}
  encoder.layer.i.crossattention.self.*         encoder.layer.i.crossattention.attention.*
  (attention.output, intermediate_query, output_query: the same names)
  embeddings.position_ids (an int64 buffer)     (none: skipped on import, written on export)
"""

from __future__ import annotations

import re

import numpy as np

from mre.model_io.safetensors_io import WeightsError
from mre.model_io.torch_state_dict import load_state_dict, materialize_non_params, state_dict
from mre.models.qformer import QFormer

LAYOUTS = ("transformers", "lavis")
QFORMER_PREFIX = "qformer."
QUERY_KEY = "query_tokens"
LAVIS_PREFIX = "sd_qformer."
LAVIS_QUERY_KEY = "sd_query_tokens"
_LAVIS_POSITION_IDS = "embeddings.position_ids"


def _from_lavis_name(name: str) -> str:
  if name.startswith("embeddings.LayerNorm."):
    return "layernorm." + name[len("embeddings.LayerNorm.") :]
  return re.sub(r"\.(attention|crossattention)\.self\.", r".\1.attention.", name)


def _to_lavis_name(name: str) -> str:
  if name.startswith("layernorm."):
    return "embeddings.LayerNorm." + name[len("layernorm.") :]
  return re.sub(r"\.(attention|crossattention)\.attention\.", r".\1.self.", name)


def _ours(tensors: dict, layout: str, prefix: str, query_key: str) -> dict:
  """The tensors of one Q-Former, under our names; other keys of the dict are not looked at."""
  rename = _from_lavis_name if layout == "lavis" else (lambda name: name)
  if layout == "transformers" and not any(k.startswith(prefix) for k in tensors):
    prefix = ""  # a bare Blip2QFormerModel state dict
  out = {
      rename(k[len(prefix) :]): v
      for k, v in tensors.items()
      if k.startswith(prefix) and k != query_key
  }
  if query_key in tensors:
    out[QUERY_KEY] = tensors[query_key]
  return out


def _check_layout(layout):
  if layout not in LAYOUTS:
    raise ValueError(f"unknown Q-Former weights layout {layout!r}; choose from {LAYOUTS}")


def _defaults(layout, prefix, query_key):
  if layout == "lavis":
    return (LAVIS_PREFIX if prefix is None else prefix), query_key or LAVIS_QUERY_KEY
  return (QFORMER_PREFIX if prefix is None else prefix), query_key or QUERY_KEY


def load_qformer(
    model: QFormer,
    tensors: dict,
    *,
    layout: str = "transformers",
    where: str = "Q-Former",
    prefix: str | None = None,
    query_key: str | None = None,
):
  """Copies a Q-Former state dict into `model`. `prefix` and `query_key` default to the layout's
  (`qformer.` / `query_tokens`; `sd_qformer.` / `sd_query_tokens`). Every missing, unexpected or
  mis-shaped tensor is named, with its name in the given layout. A model built under
  `nnx.eval_shape` also gets concrete dropout RNG state."""
  _check_layout(layout)
  prefix, query_key = _defaults(layout, prefix, query_key)
  try:
    load_state_dict(
        model,
        _ours(tensors, layout, prefix, query_key),
        where=where,
        ignore=(_LAVIS_POSITION_IDS,) if layout == "lavis" else (),
    )
  except WeightsError as e:
    if layout == "transformers":
      raise
    raise WeightsError(_lavis_message(str(e), prefix, query_key)) from None
  return materialize_non_params(model)


def _lavis_message(message: str, prefix: str, query_key: str) -> str:
  """`load_state_dict`'s message with our names turned back into the checkpoint's (the first line
  is `where`, which may hold a path, and is kept as is)."""
  head, _, problems = message.partition("\n")

  def back(m):
    name = m.group(0)
    return query_key if name == QUERY_KEY else prefix + _to_lavis_name(name)

  return head + "\n" + re.sub(r"\b[A-Za-z_]\w*(?:\.\w+)+|\bquery_tokens\b", back, problems)


def qformer_state_dict(
    model: QFormer,
    *,
    layout: str = "transformers",
    prefix: str | None = None,
    query_key: str | None = None,
    dtype=np.float32,
) -> dict:
  """The Q-Former's tensors in PyTorch layout under the layout's names; the LAVIS layout adds the
  `embeddings.position_ids` buffer (int64 [1, max_position_embeddings]), which LAVIS' strict
  `load_state_dict` expects."""
  _check_layout(layout)
  prefix, query_key = _defaults(layout, prefix, query_key)
  out = {}
  for name, arr in state_dict(model, dtype=dtype).items():
    if name == QUERY_KEY:
      out[query_key] = arr
    else:
      out[prefix + (_to_lavis_name(name) if layout == "lavis" else name)] = arr
  if layout == "lavis":
    positions = np.arange(model.config.max_position_embeddings, dtype=np.int64)[None]
    out[prefix + _LAVIS_POSITION_IDS] = positions
  return out
