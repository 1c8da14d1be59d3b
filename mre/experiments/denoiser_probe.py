"""How sharp is a toy editor's clean-image estimate at each noise level?

  python -m mre.experiments.denoiser_probe --model=runs/trial/plain/export --category=local

For test scenes whose ideal edit the toy judge can name, the noisy input x_t is made from that
ideal edit at each timestep, and the editor's x0 estimate (its instruction-conditioned branch,
without guidance) is compared with it: the mean colour error inside the region the edit changes,
just outside it (pixels next to the region's edge), and the judge's blur level of the estimate.
A denoiser that reads its input gets these to near zero at low noise, where x_t is almost the
answer; one that paints its guess from the source and the instruction alone shows the same
errors at t = 10 as at pure noise. README ("What the toy editor needed") reports what it showed.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from scipy import ndimage

from data_prep.toy.judge import quality
from data_prep.toy.judge.view import EditView
from mre import evaluation
from mre.data.train_input import default_data_dir
from mre.diffusion.source_skip import denoiser
from mre.editor import EditSettings, Editor, to_uint8
from mre.model_io.folders import load_any
from mre.models.pixel import PixelSpace

TIMESTEPS = (999, 800, 600, 400, 200, 100, 50, 10)


def probe(
    model,
    *,
    category: str = "local",
    items: int = 16,
    timesteps=TIMESTEPS,
    data_dir: str = "",
    dataset: str = "toy_edit/24px",
    seed: int = 0,
) -> dict:
  """{t: {"inside": error, "next_to_edge": error, "blur": judge blur level}} (errors: mean RGB
  distance in [-1, 1] units) over the first `items` test edits of `category` with a known ideal.
  `model` is a folder or a loaded Pipeline of a pixel-space editor (a reward editor is probed at
  the perfect reward)."""
  pipe = load_any(model) if isinstance(model, str) else model
  if not isinstance(pipe.vae, PixelSpace):
    raise ValueError("the probe makes x_t from images: it needs a pixel-space (toy) editor")
  bench = evaluation.load_benchmark(dataset, data_dir or default_data_dir(), "test")
  chosen = []
  for item in bench:
    if item.category != category:
      continue
    ideal = EditView(item.instruction, item.original, item.original).ideal
    if ideal is not None and np.shape(ideal) == item.original.shape:
      chosen.append((item, ideal))
    if len(chosen) == items:
      break
  if not chosen:
    raise ValueError(f"no {category!r} test edit with a known ideal in {dataset}")
  resolution = chosen[0][0].original.shape[0]
  editor = Editor(pipe, EditSettings(resolution=resolution))
  source = np.stack([it.original for it, _ in chosen]).astype(np.float32) / 127.5 - 1
  ideal = np.stack([i for _, i in chosen]).astype(np.float32) / 127.5 - 1
  context, _ = editor.text_features([it.instruction for it, _ in chosen])
  # A reward editor is probed at the perfect reward (the one its edits are made with).
  extra = {"reward": editor.reward_inputs(len(chosen))} if editor.is_reward else {}
  estimate = nnx.jit(lambda unet, s, t, c, x: denoiser(unet, editor.schedule)(s, t, c, **x))
  alpha_bar = np.asarray(editor.schedule.alphas_cumprod, np.float64)
  region = np.linalg.norm(ideal - source, axis=-1) > 0.1
  # Unchanged pixels touching the changed region: where a soft halo shows.
  ring = np.stack([ndimage.binary_dilation(r) & ~r for r in region])
  rng = np.random.default_rng(seed)
  out = {}
  for t in timesteps:
    noise = rng.standard_normal(ideal.shape).astype(np.float32)
    noisy = np.sqrt(alpha_bar[t]) * ideal + np.sqrt(1 - alpha_bar[t]) * noise
    sample = jnp.asarray(np.concatenate([noisy, source], -1), jnp.float32)
    x0 = np.asarray(estimate(pipe.unet, sample, jnp.full((len(chosen),), t), context, extra))
    error = np.linalg.norm(x0 - ideal, axis=-1)
    blur = np.mean([quality.quality_levels(to_uint8(x))["blur"] for x in x0])
    out[int(t)] = {
        "inside": float(error[region].mean()) if region.any() else 0.0,
        "next_to_edge": float(error[ring].mean()) if ring.any() else 0.0,
        "blur": float(blur),
    }
  return out


def main(argv):
  del argv
  f = flags.FLAGS
  result = probe(f.model, category=f.category, items=f.items, data_dir=f.data_dir)
  print(f"{f.category} edits, x_t made from the ideal edit; x0 estimate's error and blur:")
  for t, r in result.items():
    print(
        f"t={t:4d}  error inside {r['inside']:.3f}  next to the edge {r['next_to_edge']:.3f}"
        f"  blur level {r['blur']:.2f}"
    )


if __name__ == "__main__":
  flags.DEFINE_string("model", None, "An exported toy editor (a folder).", required=True)
  flags.DEFINE_string("category", "local", "Test edits of this category.")
  flags.DEFINE_integer("items", 16, "How many.")
  flags.DEFINE_string("data_dir", "", "TFDS data_dir ('' = ~/tensorflow_datasets).")
  app.run(main)
