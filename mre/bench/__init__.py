"""Speed of training and editing, JAX side by side with diffusers' PyTorch modules in one run.

  python -m mre.bench --preset=toy                       # the toy world's network, on this CPU
  python -m mre.bench --preset=sd15-256-train,sd15-512-edit --out=bench_out   # SD 1.5 shapes
  python -m mre.bench --config=configs/reward.py:toy     # any training config

`presets` says what is timed; `jax_side`, `torch_side` and `torch_edit` prepare it (the project's
own train step, editor and samplers against diffusers' U-Net, training loop and InstructPix2Pix
pipeline); `suite.run` times one preset's rows, the two sides in turns, and `report` prints and
writes them (JSON and Markdown). `levers` compares variants of the toy training step on a CPU.
"""
