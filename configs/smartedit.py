"""SmartEdit-style editor (second baseline): LLaVA-7B + LoRA, CLIP ViT-L/14, Q-Former, BIM, SD 1.5.

  python -m mre.smartedit_dryrun --config=configs/smartedit.py      # sizes and memory, no weights
  python -m mre.smartedit_dryrun --config=configs/smartedit.py:toy   # tiny_config's sizes
  python -m mre.train --config=configs/smartedit.py:toy              # trains the toy on the CPU
  python -m mre.train --config=configs/smartedit.py --config.model.pretrained=<SmartEdit folder>

The release's stage-2 recipe: 15k steps, AdamW lr 1e-5 (cosine, no warmup), weight decay 0, batch
128 (8 GPUs x 2 x accumulation 8), bf16, 256 px; loss = LM cross-entropy + diffusion MSE (epsilon),
weight 1 each. Trained: the U-Net, LoRA (r 8, alpha 16, dropout 0.05 on q_proj/v_proj), the
embeddings and lm_head (only the 35 new rows change: the release puts the old rows back every
step), the Q-Former, the BIM. Frozen: vision tower, projector, VAE, the LLaMA base weights.
Conditioning dropout: one draw r per sample, text -> the empty prompt's CLIP context if r < 0.1,
source latents zeroed if 0.05 <= r < 0.15, the BIM map never dropped. Multi-reward on top:
--config.model.reward.enabled=True (the U-Net becomes a RewardUNet with new reward modules).

`:toy` (mre/smartedit_train.py, mre/smartedit_setup.py): the toy world at 24 px, every network from
random weights and trained but the CLIP ViT (LLaMA and projector too: there is nothing pretrained
to keep), the toy InstructPix2Pix U-Net and CLIP text sizes (`model.scratch`), `tiny_config`'s
LLaMA/ViT/Q-Former/BIM, a word-level LLM tokenizer, the release's conversation and template with
all 32 `<img_k>` tokens, the release's alignment stage first (1,000 steps), the release's
conditioning dropout and loss weights, no EMA, the toy's AdamW schedule; validation's LLM answers
greedy (temperature 0).
"""

import ml_collections

from configs import common

TRAINED = ("unet", "lora", "embeddings", "sd_qformer", "bim")
FROZEN = ("llm_base", "vision_tower", "mm_projector", "vae")
# The toy's, from scratch. Its CLIP ViT stays at its random weights, as the release's stays at
# CLIP's: the loss stops the patches' gradient (the release's tower is frozen), so listing it
# here would only have let weight decay shrink it.
TOY_TRAINED = ("llm", "mm_projector")


def get_config(arg=None):
  variant = common.parse_variant(arg)
  c = common.base_config()
  c.stage = "smartedit"
  c.workdir = "runs/smartedit" if variant == "full" else "runs/smartedit_toy"
  c.model.family = "smartedit"
  # A SmartEdit release or editor folder (LLM-*, embeddings_qformer, ...): the release sizes
  # train from it (mre/smartedit_release.py); "" for the toy (from scratch)
  c.model.pretrained = ""
  c.model.smartedit = ml_collections.ConfigDict(
      dict(
          size="7b",  # "7b" | "13b" (the release's) | "toy" (tiny, for the CPU)
          # The folders a SmartEdit folder needs beside it (override its smartedit.json):
          clip="",  # Hugging Face CLIP folder (openai/clip-vit-large-patch14)
          ip2p="",  # InstructPix2Pix / SD 1.5 diffusers folder: VAE, CLIP text, scheduler
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
          num_img_tokens=32,  # the <img_k> tokens of the answer (the release's 32)
          max_prompt_tokens=160,  # training conversations are padded to this many tokens (toy)
          # The release's stage 1, textual alignment (its train/TrainStage1.py): the first
          # align_steps steps train LM cross-entropy + align_loss_weight * MSE(Q-Former output,
          # frozen CLIP text context of the instruction), no U-Net; SmartEdit training after.
          align_steps=0,
          align_loss_weight=1.0,
          # Ours: that MSE kept in the SmartEdit stage at this weight (0: the release's stage 2).
          edit_align_loss_weight=0.0,
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
    common.apply_toy(c)  # the toy world, and the toy InstructPix2Pix U-Net and CLIP text sizes
    c.model.smartedit.size = "toy"
    c.model.smartedit.lora_r = 2
    c.model.smartedit.lora_alpha = 4.0
    # Everything starts from random weights: there is no pretrained LLaMA to keep frozen.
    c.model.smartedit.trained = TRAINED + TOY_TRAINED
    # Validation's answers greedy: sampled at the release's 0.7, one of 20 answers of a 300-step
    # run's LLM (mre.eval on its export) lacked an <img_k> token, and the editor then refuses the
    # whole batch (README, "Training the toy SmartEdit").
    c.model.smartedit.temperature = 0.0
    # The release's alignment stage first (1,000 steps, about 15 minutes here: no U-Net call).
    # Without it the LLM, trained from random weights, gave the U-Net no instruction and the toy
    # did not edit (following 5%); from stage 1's U-Net, the alignment alone gave 41% on 100 test
    # edits (README, "The paper's claim in the toy world", its SmartEdit rows).
    c.model.smartedit.align_steps = 1000
    c.train.ema_decay = 0.0
    c.train.grad_accum = 1
    c.mesh.fsdp = 1
    c.mesh.data = -1
  return c
