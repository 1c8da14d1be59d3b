"""Precomputed VAE latents of a training set (`config.data.precompute_latents`).

With a frozen VAE, encoding both images of every triplet at every step repeats the same work each
epoch. The cache stores, per training record, the posterior mode of the original image (what the
U-Net is conditioned on) and the posterior mean and log-variance of the edited image, so that each
step still draws a fresh posterior sample of the target, as training without the cache does.
Images are resized (short side) and center-cropped to the resolution: a cache has no random crop or
flip. Building is resumable (`meta.json` counts the records written) and runs on process 0.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx
from PIL import Image
from tqdm import tqdm

ARRAYS = ("original_latent", "edited_mean", "edited_logvar")


def center_square(image: np.ndarray, resolution: int) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [R, R, 3] in [-1, 1]: short side to R, then the central square."""
  img = Image.fromarray(np.asarray(image, np.uint8)[:, :, :3])
  scale = resolution / min(img.size)
  w, h = max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))
  if (w, h) != img.size:
    img = img.resize((w, h), Image.BICUBIC)
  left, top = (w - resolution) // 2, (h - resolution) // 2
  img = img.crop((left, top, left + resolution, top + resolution))
  return np.asarray(img, np.float32) / 127.5 - 1.0


def _open(folder, n, shape, mode):
  return {
      k: np.lib.format.open_memmap(
          os.path.join(folder, k + ".npy"),
          mode=mode,
          dtype=np.float32,
          shape=(n,) + shape if mode == "w+" else None,
      )
      for k in ARRAYS
  }


def build(
    vae, source, folder: str, resolution: int, *, batch_size: int = 32, keys=("original", "edited")
) -> dict:
  """Encodes every record of `source` once (resuming a partial cache); returns the meta dict."""
  os.makedirs(folder, exist_ok=True)
  meta_path = os.path.join(folder, "meta.json")
  n = len(source)
  encode = nnx.jit(lambda v, x: (lambda p: (p.mean, p.logvar))(v.encode(x)))
  probe = encode(vae, np.zeros((1, resolution, resolution, 3), np.float32))[0]
  shape = tuple(probe.shape[1:])
  meta = {"records": n, "done": 0, "resolution": resolution, "latent_shape": list(shape)}
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      old = json.load(f)
    if {k: old.get(k) for k in ("records", "resolution", "latent_shape")} != {
        k: meta[k] for k in ("records", "resolution", "latent_shape")
    }:
      raise ValueError(
          f"{folder} holds a latent cache of another dataset or resolution ({old}); "
          "delete it or choose another workdir"
      )
    meta = old
  arrays = _open(folder, n, shape, "r+" if meta["done"] else "w+")
  with tqdm(total=n, initial=meta["done"], desc="encoding latents", unit="rec") as bar:
    for start in range(meta["done"], n, batch_size):
      stop = min(start + batch_size, n)
      records = [source[i] for i in range(start, stop)]
      originals = np.stack([center_square(r[keys[0]], resolution) for r in records])
      edited = np.stack([center_square(r[keys[1]], resolution) for r in records])
      orig_mean, _ = encode(vae, originals)
      ed_mean, ed_logvar = encode(vae, edited)
      arrays["original_latent"][start:stop] = np.asarray(orig_mean)
      arrays["edited_mean"][start:stop] = np.asarray(ed_mean)
      arrays["edited_logvar"][start:stop] = np.asarray(ed_logvar)
      for a in arrays.values():
        a.flush()
      meta["done"] = stop
      with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f)
      os.replace(meta_path + ".tmp", meta_path)  # counted only once the arrays are on disk
      bar.update(stop - start)
  return meta


class LatentSource:
  """The records of `source` with their images replaced by the cached latents."""

  def __init__(self, source, folder: str):
    with open(os.path.join(folder, "meta.json")) as f:
      meta = json.load(f)
    if meta["done"] != meta["records"] or meta["records"] != len(source):
      raise ValueError(f"latent cache {folder} is incomplete or stale: {meta}")
    self.source, self.arrays = source, _open(folder, None, None, "r")

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    record = {k: v for k, v in self.source[i].items() if k not in ("original", "edited", "ideal")}
    record.update({k: a[i] for k, a in self.arrays.items()})
    return record


def ensure(vae, source, folder: str, resolution: int) -> LatentSource:
  """Builds the cache on process 0 (the others wait), then serves it."""
  if jax.process_index() == 0:
    build(vae, source, folder, resolution)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    multihost_utils.sync_global_devices("latent cache built")
  return LatentSource(source, folder)
