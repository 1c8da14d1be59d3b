"""Q-Former parity with transformers' Blip2QFormerModel (queries in, encoder states of another
width, an encoder mask); the SmartEdit release's LAVIS names import to the same model as
transformers' names; exports in both layouts byte-identical; mismatches named in the release's
names; dropout only in training mode."""

import numpy as np
import pytest
from flax import nnx

from mre.model_io.qformer_weights import load_qformer, qformer_state_dict
from mre.model_io.safetensors_io import WeightsError
from mre.model_io.torch_state_dict import param_paths
from mre.models.config import ConfigError
from mre.models.qformer import QFormer, QFormerConfig, smartedit_config
from tests.reference import randomize, torch

# Cross-attention on layers 0 and 2 of 4; encoder states 24 wide, queries 32 wide.
QFORMER = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=37,
    encoder_hidden_size=24,
    cross_attention_frequency=2,
    max_position_embeddings=40,
)
QUERIES = 7


def _lavis_names(layers, frequency):
  """The release's `embeddings_qformer` names (LAVIS' BertModel without text embeddings or text
  feed-forward), written out from its module tree."""
  blocks = lambda kind: [f"{kind}.self.{p}" for p in ("query", "key", "value")] + [
      f"{kind}.output.dense",
      f"{kind}.output.LayerNorm",
  ]
  names = ["sd_qformer.embeddings.LayerNorm"]
  for i in range(layers):
    parts = blocks("attention") + (blocks("crossattention") if i % frequency == 0 else [])
    parts += ["intermediate_query.dense", "output_query.dense", "output_query.LayerNorm"]
    names += [f"sd_qformer.encoder.layer.{i}.{p}" for p in parts]
  return {f"{n}.{leaf}" for n in names for leaf in ("weight", "bias")} | {
      "sd_query_tokens",
      "sd_qformer.embeddings.position_ids",
  }


@pytest.fixture(scope="module")
def reference():
  from transformers import Blip2QFormerConfig, Blip2QFormerModel

  torch.manual_seed(0)
  ref = randomize(Blip2QFormerModel(Blip2QFormerConfig(**QFORMER)), 1)
  tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
  tensors["query_tokens"] = np.random.RandomState(2).randn(1, QUERIES, 32).astype(np.float32)
  return ref, tensors


def _config(**kw):
  return dict(QFORMER, num_query_tokens=QUERIES, **kw)


def _model(**kw):
  return nnx.eval_shape(lambda: QFormer(_config(**kw), rngs=nnx.Rngs(0)))


# One compiled program per model structure and mode, shared by the tests.
_run = nnx.jit(lambda model, states, mask: model(states, mask))


def _inputs():
  rs = np.random.RandomState(3)
  states = rs.randn(2, 9, 24).astype(np.float32)
  mask = np.ones((2, 9), np.int64)
  mask[0, 5:] = 0  # as the release picks the <img_k> positions out of the LLM sequence
  mask[1, :2] = 0
  return states, mask


def _lavis(tensors):
  """A release-layout dict built from transformers' names, one name at a time."""
  out = {"sd_query_tokens": tensors["query_tokens"]}
  out["sd_qformer.embeddings.position_ids"] = np.arange(40, dtype=np.int64)[None]
  for name in _lavis_names(4, 2) - set(out):
    ours = name[len("sd_qformer.") :].replace("embeddings.LayerNorm.", "layernorm.")
    out[name] = tensors[ours.replace("attention.self.", "attention.attention.")]
  return out


def test_matches_transformers(reference):
  ref, tensors = reference
  ours = load_qformer(_model(), tensors)  # a bare Blip2QFormerModel state dict + query_tokens
  states, mask = _inputs()
  queries = torch.tensor(tensors["query_tokens"]).expand(2, -1, -1)
  with torch.no_grad():
    want = ref(
        query_embeds=queries,
        encoder_hidden_states=torch.tensor(states),
        encoder_attention_mask=torch.tensor(mask),
    ).last_hidden_state.numpy()
    unmasked = ref(query_embeds=queries, encoder_hidden_states=torch.tensor(states))
  got = _run(ours, states, mask)
  assert got.shape == (2, QUERIES, 32)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
  np.testing.assert_allclose(
      np.asarray(_run(ours, states, None)), unmasked.last_hidden_state.numpy(), atol=1e-4, rtol=0
  )


def test_release_names_import_as_transformers_names_and_export_unchanged(reference):
  _, tensors = reference
  given = {"qformer." + k: v for k, v in tensors.items() if k != "query_tokens"}
  given["query_tokens"] = tensors["query_tokens"]  # Blip2Model's names
  lavis = _lavis(tensors)
  assert set(lavis) == _lavis_names(4, 2) and len(lavis) == len(given) + 1
  lavis["lm_head.weight"] = np.zeros((3, 5), np.float32)  # the same file's other modules: not read
  lavis["mm_projector.weight"] = np.zeros((5, 3), np.float32)

  from_hf = load_qformer(_model(), given)
  from_release = load_qformer(_model(), lavis, layout="lavis")
  for (_, name, a), (_, _, b) in zip(param_paths(from_hf), param_paths(from_release)):
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=name)
  states, mask = _inputs()
  np.testing.assert_array_equal(
      np.asarray(_run(from_hf, states, mask)), np.asarray(_run(from_release, states, mask))
  )

  for model, layout, want in ((from_hf, "transformers", given), (from_release, "lavis", lavis)):
    exported = qformer_state_dict(model, layout=layout)
    assert set(exported) == set(want) - {"lm_head.weight", "mm_projector.weight"}, layout
    for name, arr in exported.items():
      assert arr.dtype == want[name].dtype and arr.shape == want[name].shape, name
      assert arr.tobytes() == want[name].tobytes(), (layout, name)


def test_mismatches_are_named_in_the_release_names(reference):
  _, tensors = reference
  lavis = _lavis(tensors)
  # A checkpoint with cross-attention on every layer, no query tokens, a wrong LayerNorm width.
  for name in _lavis_names(4, 1) - _lavis_names(4, 2):
    lavis[name] = np.zeros((32, 32) if name.endswith("weight") else (32,), np.float32)
  del lavis["sd_query_tokens"]
  lavis["sd_qformer.embeddings.LayerNorm.weight"] = np.ones((31,), np.float32)
  model = nnx.eval_shape(lambda: QFormer(_config(), rngs=nnx.Rngs(0)))
  with pytest.raises(WeightsError) as err:
    load_qformer(model, lavis, layout="lavis", where="Q-Former in /ckpt/embeddings_qformer.bin")
  message = str(err.value)
  assert message.startswith("Q-Former in /ckpt/embeddings_qformer.bin:"), message
  assert "missing tensors: sd_query_tokens" in message, message
  assert "sd_qformer.encoder.layer.1.crossattention.self.key.bias" in message, message
  assert "sd_qformer.encoder.layer.1.crossattention.output.LayerNorm.weight" in message, message
  assert "sd_qformer.embeddings.LayerNorm.weight has shape (31,)" in message, message


def test_dropout_only_in_training(reference):
  _, tensors = reference
  model = load_qformer(_model(), tensors)
  states, mask = _inputs()
  before = np.asarray(_run(model, states, mask))
  model.train()
  first, second = (np.asarray(_run(model, states, mask)) for _ in range(2))
  assert not np.allclose(first, before) and not np.allclose(first, second)
  model.eval()
  np.testing.assert_array_equal(np.asarray(_run(model, states, mask)), before)
  # Training's attention (written out, to drop out probabilities) computes what the fused one does.
  barely = load_qformer(_model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=1e-9), tensors)
  barely.train()
  np.testing.assert_allclose(np.asarray(_run(barely, states, mask)), before, atol=1e-5, rtol=0)


def test_smartedit_sizes_match_transformers():
  """The release's Q-Former (bert-base, 6 layers, 77 queries, encoder = LLaVA-7B's 4096 states)
  has the parameter count of transformers' model of that config plus the queries."""
  from transformers import Blip2QFormerConfig, Blip2QFormerModel

  cfg = smartedit_config(4096)
  assert [cfg.has_cross_attention(i) for i in range(6)] == [True, False] * 3
  with torch.device("meta"):
    ref = Blip2QFormerModel(
        Blip2QFormerConfig(**{k: v for k, v in cfg.raw.items() if k != "num_query_tokens"})
    )
  want = sum(p.numel() for p in ref.parameters()) + 77 * 768
  model = nnx.eval_shape(lambda: QFormer(cfg, rngs=nnx.Rngs(0)))
  assert sum(int(np.prod(v.shape)) for _, _, v in param_paths(model)) == want
  assert model.query_tokens.shape == (1, 77, 768)


def test_unsupported_configs_are_refused():
  with pytest.raises(ConfigError, match="use_qformer_text_input"):
    QFormerConfig.from_dict(_config(use_qformer_text_input=True))
  with pytest.raises(ConfigError, match="encoder_hidden_size"):
    QFormerConfig.from_dict({k: v for k, v in QFORMER.items() if k != "encoder_hidden_size"})
  blip2 = QFormerConfig.from_dict(dict(qformer_config=QFORMER, num_query_tokens=5))
  assert blip2.num_query_tokens == 5 and blip2.encoder_hidden_size == 24
