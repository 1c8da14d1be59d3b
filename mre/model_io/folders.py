"""Which format a model folder holds, and loading it whichever it is.

A folder is an mre checkpoint (`mre.model_io.native_format`, `mre_model.json`) or a diffusers
pipeline folder (`mre.model_io.diffusers_folder`, `model_index.json` and `unet/`, `vae/`, ...).
`mre.edit`, `mre.eval`, `mre.convert` and a stage-2 start take either.
"""

from __future__ import annotations

import os

from mre.model_io import diffusers_folder, native_format
from mre.pipeline import Pipeline


def is_diffusers(folder: str) -> bool:
  """A diffusers pipeline folder: `model_index.json`, or at least a `unet/`."""
  return os.path.exists(os.path.join(folder, "model_index.json")) or os.path.isdir(
      os.path.join(folder, "unet")
  )


def load_any(folder: str, **kw) -> Pipeline:
  """A pipeline from either an mre checkpoint or a diffusers-format folder."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"model folder {folder} does not exist")
  if native_format.is_native(folder):
    return native_format.load_native(folder, **kw)
  if is_diffusers(folder):
    return diffusers_folder.load_pipeline(folder, **kw)
  raise FileNotFoundError(
      f"{folder} is neither an mre checkpoint ({native_format.MARKER}) nor a "
      "diffusers pipeline folder (model_index.json, unet/, vae/, ...)"
  )
