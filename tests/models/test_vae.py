"""AutoencoderKL parity with diffusers: posterior mean/std, a posterior sample, decoded image."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mre.model_io import torch_state_dict
from mre.model_io.diffusers_folder import legacy_vae_rename
from mre.models.vae import AutoencoderKL
from tests.reference import VAE_CONFIG, nchw, nhwc, randomize, torch


def test_vae_matches_diffusers():
  from diffusers import AutoencoderKL as TorchVAE

  torch.manual_seed(0)
  ref = randomize(TorchVAE(**VAE_CONFIG), 4)
  ours = AutoencoderKL(dict(ref.config), rngs=nnx.Rngs(0))
  torch_state_dict.load_state_dict(
      ours, {k: v.numpy() for k, v in ref.state_dict().items()}, where="vae"
  )
  x = np.random.RandomState(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    post = ref.encode(torch.tensor(x)).latent_dist
    decoded = ref.decode(post.mean).sample.numpy()
  ours_post = ours.encode(nhwc(x))
  np.testing.assert_allclose(nchw(ours_post.mode()), post.mean.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(nchw(ours_post.std), post.std.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(nchw(ours.decode(ours_post.mode())), decoded, atol=1e-4, rtol=0)
  # A sample is mean + std * noise with the noise drawn from the key.
  key = jax.random.key(0)
  noise = jax.random.normal(key, ours_post.mean.shape)
  np.testing.assert_allclose(
      np.asarray(ours_post.sample(key)),
      np.asarray(ours_post.mean + ours_post.std * noise),
      atol=1e-6,
  )
  assert ours.config.scaling_factor == ref.config.scaling_factor
  z = jnp.ones((1, 4, 4, 4))
  np.testing.assert_allclose(ours.unscale_latents(ours.scale_latents(z)), z, atol=1e-6)


def test_legacy_attention_names_are_renamed():
  assert (
      legacy_vae_rename("encoder.mid_block.attentions.0.query.weight")
      == "encoder.mid_block.attentions.0.to_q.weight"
  )
  assert (
      legacy_vae_rename("decoder.mid_block.attentions.0.proj_attn.bias")
      == "decoder.mid_block.attentions.0.to_out.0.bias"
  )
  assert (
      legacy_vae_rename("decoder.mid_block.attentions.0.group_norm.weight")
      == "decoder.mid_block.attentions.0.group_norm.weight"
  )
