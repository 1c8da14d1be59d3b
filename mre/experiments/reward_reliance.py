"""Does a reward editor use its reward? `python -m mre.experiments.reward_reliance --model=DIR`.

On training triplets, the denoising loss of the editor with each triplet's own reward is compared
with the loss when the rewards are shuffled across the batch (same images, noise and timesteps),
per band of timesteps. A model that ignores its reward gets the same loss both ways; one that reads
it predicts its flawed targets better with the true reward. The bands tell where: low timesteps
hold fine detail (noise, blur), higher ones layout and colours (following, preserving).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from mre.data import train_input
from mre.diffusion.schedule import add_noise, schedule_from_config, training_target
from mre.diffusion.source_skip import denoiser
from mre.model_io.folders import load_any
from mre.models.reward_config import RewardInputs
from mre.models.reward_unet import RewardUNet

BANDS = ((0, 300), (300, 700), (700, 1000))


def reward_reliance(
    export, config, *, batches: int = 4, batch_size: int = 128, bands=BANDS, seed: int = 0
) -> dict:
  """{"t a-b": {"true": loss, "shuffled": loss, "gain": 1 - true/shuffled}} over `batches`
  batches of the training split `config` names (its data fields only). `export` is a folder or
  a loaded Pipeline."""
  pipe = load_any(export) if isinstance(export, str) else export
  if not isinstance(pipe.unet, RewardUNet):
    raise ValueError(f"{export} holds an editor without reward: nothing to measure")
  schedule = schedule_from_config(pipe.scheduler_config)
  unet, text_encoder, vae = pipe.unet, pipe.text_encoder, pipe.vae
  data = train_input.TrainIterator(
      train_input.open_dataset(config),
      config,
      pipe.tokenizer,
      batch_size=batch_size,
      accum=1,
      reward=unet.reward_config,
  )

  @jax.jit
  def per_sample_loss(original, edited, ids, scores, reward_ids, t, noise):
    context = text_encoder(ids)[0]
    _, pooled = text_encoder(reward_ids.reshape(-1, reward_ids.shape[-1]))
    reward = RewardInputs(scores, pooled.reshape(reward_ids.shape[0], reward_ids.shape[1], -1))
    target_latents = vae.scale_latents(vae.encode(edited).mode())
    noisy = add_noise(schedule, target_latents, noise, t)
    sample = jnp.concatenate([noisy, vae.encode(original).mode()], axis=-1)
    # Through the denoiser, as the trainer computes its loss: with the source skip (the toy
    # recipes) the U-Net alone gives the edit residual, not the training target.
    out = denoiser(unet, schedule)(sample, t, context, reward=reward).astype(jnp.float32)
    target = training_target(schedule, target_latents, noise, t)
    return jnp.mean((out - target) ** 2, axis=tuple(range(1, out.ndim)))

  rng = np.random.default_rng(seed)
  sums = {band: {"true": [], "shuffled": []} for band in bands}
  for _ in range(batches):
    batch = {k: v[0] for k, v in data.next().items()}
    n = batch["original"].shape[0]
    images = (batch["original"], batch["edited"], batch["instruction_ids"])
    shuffle = rng.permutation(n)
    for band in bands:
      t = jnp.asarray(rng.integers(band[0], band[1], n))
      latent_shape = vae.encode(batch["edited"][:1]).mode().shape[1:]
      noise = jnp.asarray(rng.standard_normal((n,) + latent_shape), jnp.float32)
      sums[band]["true"].append(
          per_sample_loss(*images, batch["reward_scores"], batch["reward_ids"], t, noise)
      )
      sums[band]["shuffled"].append(
          per_sample_loss(
              *images, batch["reward_scores"][shuffle], batch["reward_ids"][shuffle], t, noise
          )
      )
  data.close()
  out = {}
  for (lo, hi), losses in sums.items():
    true = float(np.mean(np.concatenate(losses["true"])))
    shuffled = float(np.mean(np.concatenate(losses["shuffled"])))
    out[f"t {lo}-{hi}"] = {"true": true, "shuffled": shuffled, "gain": 1.0 - true / shuffled}
  return out


def main(argv):
  del argv
  from configs import reward  # pylint: disable=import-outside-toplevel

  f = flags.FLAGS
  config = reward.get_config(f.dataset_config)
  if f.data_dir:
    config.data.data_dir = f.data_dir
  result = reward_reliance(f.model, config, batches=f.batches, batch_size=f.batch_size)
  for band, r in result.items():
    print(
        f"{band}: loss with its own rewards {r['true']:.4f}, with shuffled rewards "
        f"{r['shuffled']:.4f} ({r['gain']:+.1%} less with its own)"
    )
  print(json.dumps(result))


if __name__ == "__main__":
  flags.DEFINE_string("model", None, "An exported reward editor (a folder).", required=True)
  flags.DEFINE_string(
      "dataset_config",
      "toy",
      "Variant of configs/reward.py whose training data " "is read ('toy': toy_edit/24px).",
  )
  flags.DEFINE_string("data_dir", "", "TFDS data_dir ('' = ~/tensorflow_datasets).")
  flags.DEFINE_integer("batches", 4, "Batches per band.")
  flags.DEFINE_integer("batch_size", 128, "Triplets per batch.")
  app.run(main)
