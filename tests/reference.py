"""Tiny random PyTorch reference models (diffusers / transformers), saved as real model folders."""

from pathlib import Path

import numpy as np

import torch  # parity references; the CPU build is in requirements-test.txt

UNET_CONFIGS = {
    # Linear projections and one head count per block, as SD 2.x-style configs have.
    "linear_per_block_heads": dict(
        sample_size=16,
        in_channels=8,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        use_linear_projection=True,
    ),
    # SD 1.5's shape in miniature: conv projections, one head count, three blocks, 2 layers.
    "sd15_like": dict(
        sample_size=16,
        in_channels=8,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ),
    # The toy editors' options: cross-attention only (no attention over all pixels) in chosen
    # blocks (the mid block keeps self-attention whatever `mid_block_only_cross_attention` says,
    # as in diffusers), one norm group, the pooled text added to the time embedding.
    "only_cross_attention": dict(
        sample_size=16,
        in_channels=8,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=(2, 4),
        norm_num_groups=1,
        only_cross_attention=(True, False),
        mid_block_only_cross_attention=True,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    ),
    # The time embedding as FiLM (a scale and a shift per channel after the second GroupNorm of
    # every ResNet block, the mid block's too), with the pooled text in it as in the toy editors.
    "scale_shift": dict(
        sample_size=16,
        in_channels=8,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=2,
        norm_num_groups=1,
        resnet_time_scale_shift="scale_shift",
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    ),
}
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=16,
)
CLIP_CONFIG = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
)
TOKEN_WORDS = ["turn", "the", "red", "circle", "blue", "make", "it", "darker", "none"]


def randomize(module, seed, scale=0.05):
  """Perturb every parameter, so zero-initialised ones (conv_out, ...) are tested too."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(torch.randn(p.shape, generator=g) * scale)
  return module.eval()


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def make_tiny_pipeline_dir(root):
  """A whole InstructPix2Pix pipeline folder written by diffusers' own save_pretrained."""
  from diffusers import (
      AutoencoderKL,
      EulerAncestralDiscreteScheduler,
      StableDiffusionInstructPix2PixPipeline,
      UNet2DConditionModel,
  )
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

  from mre.model_io.word_tokenizer import write_word_tokenizer

  root = Path(root)
  tok_dir = write_word_tokenizer(str(root / "tok"), TOKEN_WORDS)
  tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
  torch.manual_seed(0)
  unet = randomize(UNet2DConditionModel(**UNET_CONFIGS["sd15_like"]), 1)
  vae = randomize(AutoencoderKL(**VAE_CONFIG), 2)
  text = randomize(
      CLIPTextModel(
          CLIPTextConfig(
              vocab_size=len(tokenizer),
              eos_token_id=tokenizer.eos_token_id,
              bos_token_id=tokenizer.bos_token_id,
              pad_token_id=tokenizer.pad_token_id,
              **CLIP_CONFIG,
          )
      ),
      3,
  )
  sched = EulerAncestralDiscreteScheduler(
      beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
  )
  pipe = StableDiffusionInstructPix2PixPipeline(
      vae=vae,
      text_encoder=text,
      tokenizer=tokenizer,
      unet=unet,
      scheduler=sched,
      safety_checker=None,
      feature_extractor=None,
      requires_safety_checker=False,
  )
  path = str(root / "ip2p")
  pipe.save_pretrained(path)
  return path
