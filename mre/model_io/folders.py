"""Which format a model folder holds, and loading it whichever it is.

A folder is an mre checkpoint (`mre.model_io.native_format`, `mre_model.json`), a diffusers
pipeline folder (`mre.model_io.diffusers_folder`, `model_index.json` and `unet/`, `vae/`, ...), or
a SmartEdit editor folder (`mre.model_io.smartedit_folder`: the release's `LLM-<step>/`, ... and
`smartedit.json`). `load_any` loads the first two (`mre.convert`, a stage-2 start take them);
`load_for_editing` all three (`mre.edit`, `mre.eval`).
"""

from __future__ import annotations

import os
from typing import Optional

from mre.model_io import diffusers_folder, native_format, smartedit_folder
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
  if smartedit_folder.is_editor_folder(folder):
    raise ValueError(
        f"{folder} is a SmartEdit editor folder: mre.edit and mre.eval take it; this needs an "
        "InstructPix2Pix-family pipeline (an mre checkpoint or a diffusers folder)"
    )
  raise FileNotFoundError(
      f"{folder} is neither an mre checkpoint ({native_format.MARKER}) nor a "
      "diffusers pipeline folder (model_index.json, unet/, vae/, ...) nor a SmartEdit editor "
      f"folder (LLM-<step>/, ..., {smartedit_folder.EDITOR_JSON})"
  )


def load_for_editing(folder: str, *, smartedit: Optional[dict] = None, dtype=None):
  """What an editor edits with: a `Pipeline` (`load_any`) or, for a SmartEdit editor folder, a
  `SmartEditPipeline`; `smartedit` overrides entries of its `smartedit.json` (the flags)."""
  kw = {} if dtype is None else {"dtype": dtype}
  if os.path.isdir(folder) and smartedit_folder.is_editor_folder(folder):
    if native_format.is_native(folder) or is_diffusers(folder):
      raise ValueError(f"{folder} holds both a SmartEdit editor and an InstructPix2Pix pipeline")
    return smartedit_folder.load_editor_folder(folder, smartedit, **kw)
  return load_any(folder, **kw)
