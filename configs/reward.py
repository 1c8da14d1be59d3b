"""Stage 2: the reward-conditioned editor (the paper's recipe), from a stage-1 pipeline folder.

  python -m mre.train --config=configs/reward.py --config.model.pretrained=/models/ip2p \\
      --config.workdir=runs/reward
  python -m mre.train --config=configs/reward.py:toy      # the toy world on a CPU, offline
      (trains the stage-1 toy editor first, into runs/ip2p_toy, unless it is there already)

Ablations: --config.model.reward.use_texts=False (scores only), .use_scores=False (texts only),
.inject_unet=False (latent injection only), .inject_latent=False (U-Net injection only),
.form=released (the public checkpoint's module layout), .dropout_prob=0.1 (enables reward guidance).
"""

import os

from configs import common, ip2p


def get_config(arg=None):
  variant = common.parse_variant(arg)
  c = common.base_config()
  c.stage = "reward"
  c.workdir = "runs/reward" if variant == "full" else "runs/reward_toy"
  c.model.reward.enabled = True
  c.model.pretrained = "models/instruct-pix2pix"  # the stage-1 pipeline (diffusers or mre format)
  # The paper: 256 px, random flip, batch 4 x accumulation 4 per GPU, AdamW 5e-5 constant, no
  # warmup, weight decay 1e-2, clip 1.0, conditioning dropout 0.05, EMA, gradient checkpointing,
  # 10k steps, the whole U-Net trained; VAE and text encoder frozen.
  c.data.name = "reward_edit"
  c.data.resolution = 256
  c.train.lr = 5e-5
  c.train.batch_per_device = 4
  c.train.grad_accum = 4
  c.train.steps = 10_000
  c.train.checkpoint_every = 500
  if variant == "toy":
    common.apply_toy(c)
    # As in the paper, stage 2 fine-tunes a trained stage-1 editor: the toy one in runs/ip2p_toy,
    # trained first by this command when its export is not there yet (`train.ensure_stage1`).
    c.stage1 = ip2p.get_config("toy")
    c.model.pretrained = os.path.join(c.stage1.workdir, "export")
    common.apply_toy_stage2(c)
  return c
