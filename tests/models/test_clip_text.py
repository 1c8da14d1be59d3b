"""CLIP text encoder parity with transformers' CLIPTextModel (last hidden state and pooled)."""

import numpy as np
import pytest
from flax import nnx

from mre.model_io import torch_state_dict
from mre.models.clip_text import CLIPTextModel
from tests.reference import CLIP_CONFIG, randomize, torch


@pytest.mark.parametrize("eos_token_id", [2, 98])  # legacy argmax pooling, and the real EOS id
def test_clip_matches_transformers(eos_token_id):
  from transformers import CLIPTextConfig, CLIPTextModel as TorchCLIP

  torch.manual_seed(0)
  ref = randomize(
      TorchCLIP(
          CLIPTextConfig(
              vocab_size=99,
              eos_token_id=eos_token_id,
              bos_token_id=97,
              pad_token_id=1,
              **CLIP_CONFIG,
          )
      ),
      5,
  )
  ours = CLIPTextModel(ref.config.to_dict(), rngs=nnx.Rngs(0))
  torch_state_dict.load_state_dict(
      ours,
      {k: v.numpy() for k, v in ref.state_dict().items()},
      where="clip",
      ignore=("position_ids",),
      rename=lambda k: k if k.startswith("text_model.") else "text_model." + k,
  )
  rs = np.random.RandomState(0)
  ids = rs.randint(3, 97, (3, 77))
  for row, end in enumerate([5, 20, 76]):
    ids[row, end] = 98
    ids[row, end + 1 :] = 1
  with torch.no_grad():
    out = ref(torch.tensor(ids))
  hidden, pooled = nnx.jit(lambda m, i: m(i))(ours, ids)
  np.testing.assert_allclose(np.asarray(hidden), out.last_hidden_state.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=1e-4, rtol=0)
