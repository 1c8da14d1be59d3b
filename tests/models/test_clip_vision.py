"""CLIP vision tower parity with transformers' CLIPVisionModel (every hidden state, the pooled
feature, layer -2 without the class token); weights from CLIPVisionModel and whole-CLIPModel state
dicts and folders, named mismatches, exports byte-identical and readable by transformers."""

import numpy as np
import pytest
from flax import nnx

from mre.model_io.clip_vision_weights import (
    clip_vision_state_dict,
    load_clip_vision,
    load_clip_vision_folder,
    load_projector,
    projector_state_dict,
    save_clip_vision_folder,
)
from mre.model_io.safetensors_io import WeightsError
from mre.models.clip_vision import CLIPVisionConfig, CLIPVisionModel, mm_projector, select_features
from mre.models.config import ConfigError
from tests.reference import CLIP_CONFIG, nchw, randomize, torch

# 5x5 patches of 6 pixels; 3 layers so that layer -2 is neither the first nor the last.
VISION = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=30,
    patch_size=6,
)


@pytest.fixture(scope="module")
def reference():
  from transformers import CLIPVisionConfig as TorchConfig, CLIPVisionModel as TorchModel

  torch.manual_seed(0)
  return randomize(TorchModel(TorchConfig(**VISION)), 1)


def _tensors(module):
  return {k: v.numpy() for k, v in module.state_dict().items()}


def _pixels():
  return np.random.RandomState(0).randn(2, 30, 30, 3).astype(np.float32)


def _run(model, pixels):
  return nnx.jit(lambda m, p: m(p))(model, pixels)


def _assert_close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=0)


def test_matches_transformers(reference):
  ours = CLIPVisionModel(reference.config.to_dict(), rngs=nnx.Rngs(0))
  load_clip_vision(ours, _tensors(reference))  # transformers 5 names: no `vision_model.` prefix
  pixels = _pixels()
  with torch.no_grad():
    out = reference(torch.tensor(nchw(pixels)), output_hidden_states=True)
  hidden, pooled = _run(ours, pixels)
  assert len(hidden) == len(out.hidden_states) == VISION["num_hidden_layers"] + 1
  for got, want in zip(hidden, out.hidden_states):
    _assert_close(got, want.numpy())
  _assert_close(pooled, out.pooler_output.numpy())
  patches = select_features(hidden)
  assert patches.shape == (2, 25, 32)
  _assert_close(patches, out.hidden_states[-2][:, 1:].numpy())
  _assert_close(select_features(hidden, -1, drop_cls=False), out.last_hidden_state.numpy())


def test_tower_of_a_whole_clip_folder(tmp_path):
  """LLaVA takes its tower from a CLIPModel folder: the text tower and projections are left out."""
  from transformers import CLIPConfig, CLIPModel

  torch.manual_seed(0)
  clip = randomize(
      CLIPModel(CLIPConfig(text_config=dict(vocab_size=99, **CLIP_CONFIG), vision_config=VISION)),
      2,
  )
  clip.save_pretrained(str(tmp_path))
  ours = load_clip_vision_folder(str(tmp_path))
  pixels = _pixels()
  with torch.no_grad():
    out = clip.vision_model(torch.tensor(nchw(pixels)), output_hidden_states=True)
  hidden, pooled = _run(ours, pixels)
  _assert_close(select_features(hidden), out.hidden_states[-2][:, 1:].numpy())
  _assert_close(pooled, out.pooler_output.numpy())


def test_export_is_byte_identical_and_transformers_reads_it(reference, tmp_path):
  from transformers import CLIPVisionModel as TorchModel

  # The hub checkpoints' form: `vision_model.` names and, in older files, the position_ids buffer.
  given = {"vision_model." + k: v for k, v in _tensors(reference).items()}
  given["vision_model.embeddings.position_ids"] = np.arange(26, dtype=np.int64)[None]
  ours = nnx.eval_shape(lambda: CLIPVisionModel(VISION, rngs=nnx.Rngs(0)))
  load_clip_vision(ours, given)
  exported = clip_vision_state_dict(ours)
  assert sorted(exported) == sorted(k for k in given if not k.endswith("position_ids"))
  for name, arr in exported.items():
    assert arr.dtype == given[name].dtype and arr.tobytes() == given[name].tobytes(), name

  save_clip_vision_folder(ours, str(tmp_path))
  back = TorchModel.from_pretrained(str(tmp_path)).eval()
  for name, tensor in back.state_dict().items():
    np.testing.assert_array_equal(tensor.numpy(), given["vision_model." + name], err_msg=name)


def test_mismatches_are_named(reference):
  given = _tensors(reference)
  del given["encoder.layers.1.mlp.fc1.bias"]
  given["encoder.layers.3.mlp.fc1.weight"] = given["encoder.layers.0.mlp.fc1.weight"]
  given["embeddings.position_embedding.weight"] = np.zeros((37, 32), np.float32)
  ours = nnx.eval_shape(lambda: CLIPVisionModel(VISION, rngs=nnx.Rngs(0)))
  with pytest.raises(WeightsError) as err:
    load_clip_vision(ours, given)
  message = str(err.value)
  for name in (
      "vision_model.encoder.layers.1.mlp.fc1.bias",
      "vision_model.encoder.layers.3.mlp.fc1.weight",
      "vision_model.embeddings.position_embedding.weight has shape (37, 32)",
  ):
    assert name in message, message


def test_projector_loads_from_a_llava_checkpoint():
  torch.manual_seed(0)
  ref = torch.nn.Linear(32, 48)
  given = {"model.mm_projector." + k: v.detach().numpy() for k, v in ref.state_dict().items()}
  given["model.embed_tokens.weight"] = np.zeros((5, 48), np.float32)  # another module's: not read
  proj = mm_projector(32, 48, dtype=None, param_dtype=np.float32, rngs=nnx.Rngs(0))
  load_projector(proj, given, prefix="model.mm_projector.")
  x = np.random.RandomState(1).randn(3, 32).astype(np.float32)
  with torch.no_grad():
    _assert_close(proj(x), ref(torch.tensor(x)).numpy())
  exported = projector_state_dict(proj, prefix="model.mm_projector.")
  assert sorted(exported) == ["model.mm_projector.bias", "model.mm_projector.weight"]
  for name, arr in exported.items():
    assert arr.tobytes() == given[name].tobytes(), name


def test_unsupported_configs_and_inputs_are_refused():
  with pytest.raises(ConfigError, match="attention_dropout"):
    CLIPVisionConfig.from_dict(dict(VISION, attention_dropout=0.1))
  with pytest.raises(ConfigError, match="image_size"):
    CLIPVisionConfig.from_dict(dict(VISION, image_size=32))
  ours = CLIPVisionModel(VISION, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="takes"):
    ours(np.zeros((1, 36, 36, 3), np.float32))
