"""The pieces of an editor, as one value: networks, tokenizer and scheduler settings.

Diffusers calls this bundle a pipeline. Loaders (`mre.model_io`) fill it from a folder, the trainer
builds one from a config (`mre.model_setup`), and the editor, the trainer and the input pipeline
tokenise texts with `tokenize`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class Pipeline:
  """The pieces of an InstructPix2Pix-style editor loaded from one folder."""

  unet: Any
  vae: Any
  text_encoder: Any
  tokenizer: Any
  scheduler_config: dict
  model_index: dict


def tokenize(tokenizer, texts):
  """Token ids [len(texts), 77] (int32) the way the SD pipelines tokenise prompts."""
  ids = tokenizer(
      list(texts),
      padding="max_length",
      max_length=tokenizer.model_max_length,
      truncation=True,
      return_tensors="np",
  ).input_ids
  return np.asarray(ids, np.int32)
