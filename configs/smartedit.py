"""SmartEdit-style editor (second baseline): LLaVA-7B + LoRA, CLIP ViT-L/14, Q-Former, BIM, SD 1.5.

  python -m mre.smartedit_dryrun --config=configs/smartedit.py      # sizes and memory, no weights
  python -m mre.smartedit_dryrun --config=configs/smartedit.py:toy
  python -m mre.train --config=configs/smartedit.py                  # refused: not trainable yet

The release's stage-2 recipe: 15k steps, AdamW lr 1e-5 (cosine, no warmup), weight decay 0, batch
128 (8 GPUs x 2 x accumulation 8), bf16, 256 px; loss = LM cross-entropy + diffusion MSE (epsilon),
weight 1 each. Trained: the U-Net, LoRA (r 8, alpha 16, dropout 0.05 on q_proj/v_proj), the
embeddings and lm_head (only the 35 new rows change: the release puts the old rows back every
step), the Q-Former, the BIM. Frozen: vision tower, projector, VAE, the LLaMA base weights.
Conditioning dropout: one draw r per sample, text -> the empty prompt's CLIP context if r < 0.1,
source latents zeroed if 0.05 <= r < 0.15, the BIM map never dropped. Multi-reward on top:
--config.model.reward.enabled=True (the U-Net becomes a RewardUNet).
"""

import ml_collections

from configs import common

TRAINED = ("unet", "lora", "embeddings", "sd_qformer", "bim")
FROZEN = ("llm_base", "vision_tower", "mm_projector", "vae")


def get_config(arg=None):
  variant = common.parse_variant(arg)
  c = common.base_config()
  c.stage = "smartedit"
  c.workdir = "runs/smartedit" if variant == "full" else "runs/smartedit_toy"
  c.model.family = "smartedit"
  c.model.pretrained = ""  # a SmartEdit release folder (LLM-*, embeddings_qformer, ...) or ""
  c.model.smartedit = ml_collections.ConfigDict(
      dict(
          size="7b",  # "7b" | "13b" (the release's) | "toy" (tiny, for the CPU)
          clip="",  # Hugging Face CLIP folder (openai/clip-vit-large-patch14)
          base_llm="",  # LLaVA-7B-v1 / Vicuna folder: the original vocabulary rows
          llm_tokenizer="",  # LLaMA tokenizer folder
          lora_r=8,
          lora_alpha=16.0,
          lora_dropout=0.05,
          lora_targets=("q_proj", "v_proj"),
          trained=TRAINED,
          frozen=FROZEN,
          lm_loss_weight=1.0,
          diffusion_loss_weight=1.0,
          text_dropout=0.1,  # r < 0.1: the empty prompt's CLIP context
          image_dropout=(0.05, 0.15),  # 0.05 <= r < 0.15: zero source latents
          temperature=0.7,  # LLM sampling at inference
      )
  )
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.data.name = "instruct_pix2pix"
  c.data.resolution = 256
  c.train.steps = 15_000
  c.train.lr = 1e-5
  c.train.lr_schedule = "cosine"
  c.train.warmup_steps = 0
  c.train.weight_decay = 0.0
  c.train.batch_per_device = 2
  c.train.grad_accum = 8
  c.train.cond_dropout = 0.05
  c.train.ema_decay = 0.0  # the release keeps no EMA
  c.train.checkpoint_every = 5000
  c.train.val_steps = 100  # the release edits with 100 steps, s_T 7.5, s_I 1.5
  c.mesh.data = 1
  c.mesh.fsdp = 8
  if variant == "toy":
    common.apply_toy(c)
    c.model.smartedit.size = "toy"
    c.model.smartedit.lora_r = 2
    c.model.smartedit.lora_alpha = 4.0
    c.train.ema_decay = 0.0
    c.mesh.fsdp = 1
    c.mesh.data = -1
  return c
