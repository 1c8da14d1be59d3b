"""Generation quality, read from the edited image alone: noise, blur, blockiness and banding."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from data_prep.toy import flaws, scenes
from data_prep.toy.judge.measure import UNTONED, median3, nearest, to_rgb_array
from data_prep.toy.judge.verdicts import Verdict, failure_text, make_verdict

# Raw artifact sizes that count as "full strength" (level 1): noise in RGB units of pixel standard
# deviation, blur as the part of the edge contrast left between the flat colours, blocks and bands
# in RGB units of their spread.
_QUALITY_SCALES = {"noise": 36.0, "blur": 0.14, "blockiness": 14.0, "banding": 13.0}
_FLOOR = 0.08  # levels below this are the measurement floor of clean images


def quality_levels(edited) -> dict[str, float]:
  """Artifact levels of an image: 0 for a palette-exact rendering, about 1 at full severity.

  The reference is the image's nearest palette-exact rendering: each pixel snapped to the nearest
  named colour (untoned, plus the tones the image shows nearly exactly), after which every
  connected region of one snapped colour has its own median colour error removed, so that a
  tinted background (a preserving flaw) or a model's slightly-off colours are not artifacts.
  """
  image = to_rgb_array(edited, "edited image").astype(np.float32)
  smooth = median3(image)
  n = image.shape[0]

  palette = _image_palette(image, smooth)
  exact_index, exact_distance = nearest(image, palette)
  smooth_index, _ = nearest(smooth, palette)
  labels = np.where(exact_distance < 4.0, exact_index, smooth_index)
  reference = palette[labels]
  offsets = np.zeros_like(image)
  for value in np.unique(labels):
    components, count = ndimage.label(labels == value, structure=np.ones((3, 3), bool))
    for k in range(1, count + 1):
      region = components == k
      offsets[region] = np.median(smooth[region] - reference[region], axis=0)
  reference = reference + offsets

  def uniform(size):  # pixels whose size x size neighbourhood has one label
    return ndimage.minimum_filter(labels, size=size, mode="nearest") == ndimage.maximum_filter(
        labels, size=size, mode="nearest"
    )

  flat = uniform(5 if n >= 24 else 3)
  edge_band = ~uniform(5)  # blur spreads an edge over 2 px on each side

  noise = 1.4826 * float(np.median(np.abs(image - smooth)))

  blur = 0.0
  if edge_band.any():
    contrast = np.maximum(_neighbourhood_contrast(labels, palette, 5)[edge_band], 30.0)
    at_edges = np.linalg.norm(image - reference, axis=-1)[edge_band] / contrast
    floor = (
        np.linalg.norm(image - reference, axis=-1)[flat].mean() / float(contrast.mean())
        if flat.any()
        else 0.0
    )
    blur = max(0.0, float(at_edges.mean()) - float(floor) - 0.03)

  banding, blockiness = _stripes_and_blocks(
      (smooth - reference).mean(-1), flat, flaws.block_size(n)
  )
  # Median-filtered noise leaves a little block and stripe structure of its own.
  banding, blockiness = (
      float(np.sqrt(max(0.0, v**2 - (0.12 * noise) ** 2))) for v in (banding, blockiness)
  )
  raw = {"noise": noise, "blur": blur, "blockiness": blockiness, "banding": banding}
  return {k: raw[k] / _QUALITY_SCALES[k] for k in raw}


def _image_palette(image: np.ndarray, smooth: np.ndarray) -> np.ndarray:
  """The untoned named colours, plus each tone the image shows exactly.

  A tone counts when its "telling" colours (those at least 20 away from every untoned colour) are
  exactly (within rounding) the colour of >= 20% of the pixels, split over at least two of them,
  or of >= 30% in one (a background). Toned renderings are integer-exact, while a brightness
  offset (a band, a block) on a grey background would otherwise pass for the greyscale tone.
  """
  palette = [UNTONED]
  for tone in scenes.TONES[1:]:
    toned = scenes.tone_pixels(UNTONED.astype(np.uint8), tone).astype(np.float32)
    _, separation = nearest(toned, UNTONED)
    telling = toned[separation >= 20.0]
    if len(telling) < 2:
      continue
    raw_index, raw_distance = nearest(image, telling)
    smooth_index, smooth_distance = nearest(smooth, telling)
    exact = np.concatenate([raw_index[raw_distance < 1.5], smooth_index[smooth_distance < 1.5]])
    counts = np.bincount(exact, minlength=len(telling)) / (2.0 * raw_index.size)
    if (counts.sum() >= 0.2 and np.sum(counts >= 0.02) >= 2) or counts.max() >= 0.3:
      palette.append(toned)
  return np.concatenate(palette)


def _neighbourhood_contrast(labels: np.ndarray, palette: np.ndarray, size: int) -> np.ndarray:
  """Per pixel: the largest colour distance between its label and a label in its neighbourhood."""
  n, r = labels.shape[0], size // 2
  padded = np.pad(labels, r, mode="edge")
  contrast = np.zeros(labels.shape, np.float32)
  for dy in range(size):
    for dx in range(size):
      neighbour = padded[dy : dy + n, dx : dx + n]
      contrast = np.maximum(contrast, np.linalg.norm(palette[labels] - palette[neighbour], axis=-1))
  return contrast


def _stripes_and_blocks(residual: np.ndarray, flat: np.ndarray, block: int) -> tuple[float, float]:
  """Amplitude of the residual's row/column profile (banding) and of its block means after the
  profile is removed (blockiness), both over flat pixels only."""

  def profile(axis):
    counts = flat.sum(axis)
    sums = np.where(flat, residual, 0.0).sum(axis)
    means = np.where(counts >= 3, sums / np.maximum(counts, 1), np.nan)
    return means, counts

  rows, row_counts = profile(1)
  cols, col_counts = profile(0)

  def spread(means, counts):
    ok = ~np.isnan(means)
    if ok.sum() < 3:
      return 0.0
    weights = counts[ok] / counts[ok].sum()
    mean = float((means[ok] * weights).sum())
    return float(np.sqrt((weights * (means[ok] - mean) ** 2).sum()))

  row_spread, col_spread = spread(rows, row_counts), spread(cols, col_counts)
  profile_image = (
      np.nan_to_num(rows)[:, None] if row_spread >= col_spread else np.nan_to_num(cols)[None, :]
  )
  remainder = residual - profile_image
  n = residual.shape[0]
  cells = -(-n // block)
  means, weights = [], []
  for i in range(cells):
    for j in range(cells):
      cell = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
      count = int(flat[cell].sum())
      if count >= 3:
        means.append(float(remainder[cell][flat[cell]].mean()))
        weights.append(count)
  blocks = 0.0
  if len(means) >= 3:
    means, weights = np.array(means), np.array(weights, np.float64) / sum(weights)
    blocks = float(np.sqrt((weights * (means - (weights * means).sum()) ** 2).sum()))
  # Bands vary along one axis only, blocks along both: the other axis' spread is not banding.
  banding = float(np.sqrt(max(row_spread, col_spread) ** 2 - min(row_spread, col_spread) ** 2))
  return banding, blocks


def judge_quality(edited) -> Verdict:
  """Generation quality of an edited image, judged from the image alone."""
  levels = quality_levels(edited)
  excess = {k: max(0.0, v - _FLOOR) for k, v in levels.items()}
  ordered = sorted(excess.items(), key=lambda kv: -kv[1])
  worst = ordered[0][1]
  # The worst artifact sets the score, the others count a little; a text names each artifact
  # that is clearly there and not just a side effect of the worst one.
  total = worst + 0.3 * sum(v for _, v in ordered[1:])
  problems = [failure_text(k) for k, v in ordered if v >= 0.15 and v >= 0.5 * worst]
  return make_verdict("quality", 5.0 * (1.0 - min(1.0, total)), problems)
