"""Stage 1: InstructPix2Pix from Stable Diffusion 1.5 (the original recipe).

  python -m mre.train --config=configs/ip2p.py --config.model.pretrained=/models/sd15 \\
      --config.workdir=runs/ip2p
  python -m mre.train --config=configs/ip2p.py:toy --config.workdir=runs/ip2p_toy
"""

from configs import common


def get_config(arg=None):
  variant = common.parse_variant(arg)
  c = common.base_config()
  c.stage = "ip2p"
  c.workdir = "runs/ip2p" if variant == "full" else "runs/ip2p_toy"
  # InstructPix2Pix: SD 1.5 with conv_in widened to 8 channels; 256 px, lr 1e-4, EMA 0.9999,
  # global batch 1024 through accumulation (e.g. 8 devices x 4 x 32).
  c.model.pretrained = "models/stable-diffusion-v1-5"  # a local diffusers folder
  c.data.name = "instruct_pix2pix"
  c.train.lr = 1e-4
  c.train.batch_per_device = 4
  c.train.grad_accum = 32
  c.train.steps = 10_000
  if variant == "toy":
    common.apply_toy(c)
  return c
