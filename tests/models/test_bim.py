"""The bidirectional interaction module: parity of the two-way transformer with transformers'
`SamTwoWayTransformer` and of the positional encoding with SAM's, the whole forward against the
release's computation (built here from the same PyTorch parts), the zero-initialised heads, the
bilinear resize against `F.interpolate`, and the release-layout weights round trip."""

import math
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mre.model_io import bim_weights
from mre.model_io.safetensors_io import WeightsError, write_safetensors
from mre.model_io.torch_state_dict import load_state_dict
from mre.models.bim import (
    BIM,
    BIMConfig,
    PositionEmbeddingRandom,
    TwoWayTransformer,
    resize_bilinear,
)
from tests.reference import nchw, nhwc, randomize, torch

CFG = BIMConfig(
    qformer_dim=24,
    width=32,
    depth=2,
    heads=4,
    mlp_dim=48,
    attention_downsample_rate=2,
    conv_in_channels=8,
)


def _sam_config():
  from transformers import SamMaskDecoderConfig

  cfg = SamMaskDecoderConfig(
      hidden_size=CFG.width,
      num_hidden_layers=CFG.depth,
      num_attention_heads=CFG.heads,
      mlp_dim=CFG.mlp_dim,
      attention_downsample_rate=CFG.attention_downsample_rate,
      hidden_act="relu",
      layer_norm_eps=CFG.layer_norm_eps,
  )
  cfg._attn_implementation = "eager"
  return cfg


def _release_name(name):
  """transformers' SAM names -> the release's (SAM's own)."""
  name = name.replace("layer_norm_final_attn", "norm_final_attn")
  name = re.sub(r"\.layer_norm(\d)\.", r".norm\1.", name)
  return name.replace(
      "pe_layer.positional_embedding", "pe_layer.positional_encoding_gaussian_matrix"
  )


class _ReleaseBIM(torch.nn.Module):
  """The release's BIM forward, written with transformers' SAM modules as its parts."""

  def __init__(self):
    from transformers.models.sam.modeling_sam import SamPositionalEmbedding, SamTwoWayTransformer

    super().__init__()
    nn, w = torch.nn, CFG.width
    self.modulate_head = nn.Linear(CFG.qformer_dim, w)
    self.modulate_transformer = SamTwoWayTransformer(_sam_config())
    self.pe_layer = SamPositionalEmbedding(types.SimpleNamespace(scale=1.0, num_pos_feats=w // 2))
    self.dimension_reduction_head_zeroconv = nn.Conv2d(w, CFG.conv_in_channels, 1)
    self.dimension_reduction_head_qformer_out = nn.Linear(w, CFG.qformer_dim)

  def forward(self, qformer_out, image_tokens, latent_size):
    b, n, c = image_tokens.shape
    g = math.isqrt(n)
    image = image_tokens.permute(0, 2, 1).reshape(b, c, g, g)
    centres = (torch.arange(g, dtype=torch.float32) + 0.5) / g
    coords = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), dim=-1)  # (x, y)
    pe = self.pe_layer(coords).permute(2, 0, 1)[None].expand(b, -1, -1, -1)
    tokens = self.modulate_head(qformer_out)[:, None]  # transformers' point-batch axis
    tokens, keys = self.modulate_transformer(tokens, image, pe, None)
    context = qformer_out + 0.5 * self.dimension_reduction_head_qformer_out(tokens[:, 0])
    image = keys[:, 0].transpose(1, 2).reshape(b, c, g, g)
    image = torch.nn.functional.interpolate(
        image, size=latent_size, mode="bilinear", align_corners=False
    )
    return context, self.dimension_reduction_head_zeroconv(image)


def _release_tensors(ref):
  return {_release_name(k): v.detach().numpy() for k, v in ref.state_dict().items()}


def test_two_way_transformer_matches_transformers():
  from transformers.models.sam.modeling_sam import SamTwoWayTransformer

  torch.manual_seed(0)
  ref = randomize(SamTwoWayTransformer(_sam_config()), 1, scale=0.1)
  ours = TwoWayTransformer(CFG, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
  load_state_dict(
      ours,
      {k: v.numpy() for k, v in ref.state_dict().items()},
      where="two-way",
      rename=_release_name,
  )
  rs = np.random.RandomState(0)
  tokens = rs.randn(2, 7, CFG.width).astype(np.float32)
  image = rs.randn(2, 5, 5, CFG.width).astype(np.float32)  # NHWC
  pe = rs.randn(2, 5, 5, CFG.width).astype(np.float32)
  with torch.no_grad():
    q_ref, k_ref = ref(
        torch.tensor(tokens)[:, None], torch.tensor(nchw(image)), torch.tensor(nchw(pe)), None
    )
  flat = lambda x: x.reshape(2, 25, CFG.width)  # noqa: E731
  q, k = nnx.jit(lambda m, *a: m(*a))(ours, flat(image), flat(pe), tokens)
  np.testing.assert_allclose(np.asarray(q), q_ref[:, 0].numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(k), k_ref[:, 0].numpy(), atol=1e-4, rtol=0)


def test_positional_encoding_matches_sam():
  from transformers import SamConfig, SamModel

  torch.manual_seed(0)
  sam = SamModel(
      SamConfig(
          vision_config=dict(
              hidden_size=8,
              num_hidden_layers=1,
              num_attention_heads=2,
              image_size=32,
              patch_size=8,
              output_channels=8,
              mlp_dim=8,
              global_attn_indexes=[0],
              num_pos_feats=8,
          ),
          prompt_encoder_config=dict(hidden_size=16, image_embedding_size=5, image_size=32),
          mask_decoder_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2),
      )
  )
  pe = PositionEmbeddingRandom(8, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  gauss = sam.shared_image_embedding.positional_embedding.detach()
  pe.positional_encoding_gaussian_matrix.set_value(jnp.asarray(gauss.numpy()))
  with torch.no_grad():
    want = sam.get_image_wide_positional_embeddings()  # [1, 16, 5, 5]
  np.testing.assert_allclose(np.asarray(pe((5, 5))), nhwc(want.numpy())[0], atol=1e-5, rtol=0)
  # A non-square grid: x (columns) is the matrix's first row, y (rows) its second.
  h, w = 3, 6
  ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
  with torch.no_grad():
    want = sam.shared_image_embedding(torch.tensor(np.stack([xs, ys], -1), dtype=torch.float32))
  np.testing.assert_allclose(np.asarray(pe((h, w))), want.numpy(), atol=1e-5, rtol=0)


def test_bim_matches_the_release_forward():
  torch.manual_seed(0)
  ref = randomize(_ReleaseBIM(), 2, scale=0.1)  # the zero heads made non-zero
  ours = BIM(CFG, rngs=nnx.Rngs(0))
  bim_weights.load_bim_state_dict(ours, _release_tensors(ref))
  rs = np.random.RandomState(1)
  qformer_out = rs.randn(2, 7, CFG.qformer_dim).astype(np.float32)
  image_tokens = rs.randn(2, 16, CFG.width).astype(np.float32)  # a 4 x 4 grid
  with torch.no_grad():
    ctx_ref, res_ref = ref(torch.tensor(qformer_out), torch.tensor(image_tokens), (8, 8))
  ctx, res = nnx.jit(lambda m, q, i: m(q, i, (8, 8)))(ours, qformer_out, image_tokens)
  assert res.shape == (2, 8, 8, CFG.conv_in_channels)
  np.testing.assert_allclose(np.asarray(ctx), ctx_ref.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(res), nhwc(res_ref.numpy()), atol=1e-4, rtol=0)


def test_heads_are_zero_at_init():
  bim = BIM(CFG, rngs=nnx.Rngs(3))
  rs = np.random.RandomState(2)
  qformer_out = jnp.asarray(rs.randn(2, 7, CFG.qformer_dim), jnp.float32)
  image_tokens = jnp.asarray(rs.randn(2, 16, CFG.width), jnp.float32)
  ctx, res = nnx.jit(lambda m, q, i: m(q, i, (6, 6)))(bim, qformer_out, image_tokens)
  assert bool(jnp.all(ctx == qformer_out))
  assert res.shape == (2, 6, 6, CFG.conv_in_channels) and not bool(jnp.any(res))
  # The transformer itself is random: only the heads hide it.
  assert float(jnp.abs(bim.modulate_head.kernel[...]).max()) > 0


@pytest.mark.parametrize(
    "size_in,size_out",
    [
        ((16, 16), (32, 32)),
        ((16, 16), (24, 40)),
        ((4, 5), (9, 7)),
        ((16, 16), (8, 8)),
        ((16, 16), (12, 5)),
        ((5, 5), (5, 5)),
    ],
)
def test_resize_matches_torch_interpolate(size_in, size_out):
  x = np.random.RandomState(0).randn(2, *size_in, 3).astype(np.float32)
  want = torch.nn.functional.interpolate(
      torch.tensor(nchw(x)), size=size_out, mode="bilinear", align_corners=False
  )
  got = np.asarray(resize_bilinear(jnp.asarray(x), size_out))
  np.testing.assert_allclose(got, nhwc(want.numpy()), atol=1e-5, rtol=0)
  if all(o >= i for i, o in zip(size_in, size_out)):  # upsampling: jax.image.resize agrees too;
    jax_resize = jax.image.resize(x, (2, *size_out, 3), "bilinear")  # shrinking, it antialiases
    np.testing.assert_allclose(np.asarray(jax_resize), got, atol=1e-5, rtol=0)


def test_release_weights_import_and_export_byte_identical(tmp_path):
  torch.manual_seed(0)
  tensors = _release_tensors(randomize(_ReleaseBIM(), 3, scale=0.1))
  folder = tmp_path / "modulate-15000"
  folder.mkdir()
  write_safetensors(str(folder / "adapter_model.safetensors"), tensors)
  torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, str(tmp_path / "bim.bin"))
  for source in (str(folder), str(tmp_path / "bim.bin")):
    bim = bim_weights.load_bim(source, heads=CFG.heads)  # sizes read off the tensors
    assert bim.config == CFG
    out = bim_weights.bim_state_dict(bim)
    assert sorted(out) == sorted(tensors)
    for name, arr in tensors.items():
      assert out[name].dtype == arr.dtype and out[name].shape == arr.shape, name
      assert out[name].tobytes() == arr.tobytes(), name
  written = bim_weights.save_bim(bim, str(tmp_path / "export"))
  with open(written, "rb") as f, open(folder / "adapter_model.safetensors", "rb") as g:
    assert f.read() == g.read()
  back = bim_weights.save_bim(bim, str(tmp_path / "export.bin"))
  reread = torch.load(back, weights_only=True)
  assert all(reread[k].numpy().tobytes() == v.tobytes() for k, v in tensors.items())


def test_import_names_every_problem_and_writes_nothing():
  torch.manual_seed(0)
  tensors = _release_tensors(randomize(_ReleaseBIM(), 4))
  del tensors["modulate_transformer.layers.1.mlp.lin2.bias"]
  del tensors["pe_layer.positional_encoding_gaussian_matrix"]
  tensors["modulate_transformer.layers.0.norm5.weight"] = np.zeros(CFG.width, np.float32)
  tensors["dimension_reduction_head_zeroconv.weight"] = np.zeros((4, CFG.width, 1, 1), np.float32)
  bim = BIM(CFG, rngs=nnx.Rngs(0))
  before = bim_weights.bim_state_dict(bim)
  with pytest.raises(WeightsError) as err:
    bim_weights.load_bim_state_dict(bim, tensors, where="BIM test")
  msg = str(err.value)
  for name in (
      "modulate_transformer.layers.1.mlp.lin2.bias",
      "pe_layer.positional_encoding_gaussian_matrix",
      "modulate_transformer.layers.0.norm5.weight",
      "dimension_reduction_head_zeroconv.weight has shape (4, 32, 1, 1)",
  ):
    assert name in msg, (name, msg)
  after = bim_weights.bim_state_dict(bim)
  assert all(np.array_equal(before[k], after[k]) for k in before)
  # A mis-shaped buffer alone is named too, and nothing is written either.
  good = _release_tensors(randomize(_ReleaseBIM(), 5))
  good["pe_layer.positional_encoding_gaussian_matrix"] = np.zeros((2, 3), np.float32)
  with pytest.raises(WeightsError, match=r"positional_encoding_gaussian_matrix has shape \(2, 3\)"):
    bim_weights.load_bim_state_dict(bim, good)
  after = bim_weights.bim_state_dict(bim)
  assert all(np.array_equal(before[k], after[k]) for k in before)


def test_gaussian_matrix_is_not_trained():
  """The release registers it as a buffer: saved with the weights, outside `nnx.Param`."""
  bim = BIM(CFG, rngs=nnx.Rngs(0))
  params = nnx.to_flat_state(nnx.state(bim, nnx.Param))
  assert not any("pe_layer" in ".".join(map(str, path)) for path, _ in params)
