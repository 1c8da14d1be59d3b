"""Measurement tools of the toy judge: reading images, denoising, colour names, masks and shapes."""

from __future__ import annotations

import collections
import dataclasses
import io
from typing import Optional

import numpy as np
from PIL import Image
from scipy import ndimage

from data_prep.toy import scenes


def to_rgb_array(image, what: str = "image") -> np.ndarray:
  """uint8 [H, W, 3] from an array, a PIL image or encoded image bytes; ValueError otherwise."""
  if isinstance(image, (bytes, bytearray)):
    try:
      image = Image.open(io.BytesIO(image))
      image.load()
    except Exception as error:
      raise ValueError(f"the {what} bytes are not a readable image ({error})") from None
  if isinstance(image, Image.Image):
    image = np.asarray(image.convert("RGB"))
  if not isinstance(image, np.ndarray):
    raise ValueError(
        f"the {what} must be a uint8 [H, W, 3] array, a PIL image or PNG bytes, "
        f"got {type(image).__name__}"
    )
  if image.dtype != np.uint8:
    raise ValueError(
        f"the {what} must have dtype uint8 (0..255), got {image.dtype}; convert "
        "model outputs first, e.g. np.round((x + 1) * 127.5).clip(0, 255).astype(np.uint8)"
    )
  if image.ndim == 2:
    image = np.repeat(image[:, :, None], 3, axis=2)
  if image.ndim == 3 and image.shape[2] == 4:
    image = image[:, :, :3]
  if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 4:
    raise ValueError(f"the {what} must be an RGB image [H, W, 3], got shape {image.shape}")
  return image


def median3(image: np.ndarray) -> np.ndarray:
  """3x3 vector median: each pixel becomes the window colour nearest (in summed distance) to all
  the others. Unlike a per-channel median it never invents a colour where three regions meet."""
  h, w, _ = image.shape
  padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
  window = np.stack(
      [padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]
  )  # [9, h, w, 3]
  spread = np.zeros((9, h, w), np.float32)
  for i in range(9):
    for j in range(i + 1, 9):
      distance = np.sqrt(((window[i] - window[j]) ** 2).sum(-1))
      spread[i] += distance
      spread[j] += distance
  return np.take_along_axis(window, spread.argmin(0)[None, :, :, None], axis=0)[0]


UNTONED = np.array(list(scenes.COLOURS.values()), np.float32)
TONED_PALETTES = [
    scenes.tone_pixels(UNTONED.astype(np.uint8), t).astype(np.float32) for t in scenes.TONES
]
_ALL_TONED_COLOURS = np.unique(
    np.array(
        [scenes.tone_colour(rgb, t) for rgb in scenes.COLOURS.values() for t in scenes.TONES],
        np.float32,
    ),
    axis=0,
)


def denoise(image: np.ndarray) -> np.ndarray:
  """The 3x3 median of the image, except where a pixel is (almost) exactly a palette colour: a
  median would wear the corners off clean shapes."""
  _, distance = nearest(image, _ALL_TONED_COLOURS)
  return np.where((distance < 4.0)[..., None], image, median3(image))


def nearest(pixels: np.ndarray, palette: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Index of the nearest palette colour for each pixel [..., 3], and its distance."""
  flat = pixels.reshape(-1, 3).astype(np.float64)
  colours = np.asarray(palette, np.float64).reshape(-1, 3)
  squared = (flat**2).sum(1)[:, None] - 2.0 * flat @ colours.T + (colours**2).sum(1)[None]
  index = squared.argmin(1)
  distance = np.sqrt(np.maximum(squared[np.arange(len(flat)), index], 0.0))
  return index.reshape(pixels.shape[:-1]), distance.reshape(pixels.shape[:-1])


def colour_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Colour distance with brightness (the grey axis) counted at half weight: blocks, bands and
  global tones move colours along it, while object colours differ mostly across it."""
  difference = a - b
  brightness = difference.mean(-1, keepdims=True)
  return np.linalg.norm(difference - 0.5 * brightness, axis=-1)


def erode(mask: np.ndarray) -> np.ndarray:
  """The mask shrunk by a pixel, or the mask itself when nothing would be left."""
  inner = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool))
  return inner if inner.any() else mask


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
  if pixels <= 0 or not mask.any():
    return mask
  return ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=pixels)


def majority(values) -> Optional[str]:
  """The commonest value; a tie goes to the one seen first. (`max(set(values), ...)` broke ties
  by the set's order, which string hashing changes from process to process: the same image got
  other failure texts, and through the tone seen other preserving scores, in another process.)"""
  counts = collections.Counter(values)
  return counts.most_common(1)[0][0] if counts else None


@dataclasses.dataclass(frozen=True)
class Palette:
  """Named colours under some tones, for naming what an edited pixel shows."""

  names: tuple[str, ...]
  rgb: np.ndarray  # [K, 3]

  @classmethod
  def of(cls, names, tones) -> "Palette":
    pairs = [(n, t) for t in tones for n in names]
    rgb = np.array([scenes.tone_colour(scenes.COLOURS[n], t) for n, t in pairs], np.float32)
    return cls(tuple(n for n, _ in pairs), rgb)

  def classify(self, pixels: np.ndarray) -> np.ndarray:
    """Colour name (untoned) of each pixel [..., 3] as an array of strings."""
    return np.array(self.names)[nearest(pixels, self.rgb)[0]]


def fit_shape(pixels: np.ndarray, wanted: str) -> tuple[str, float]:
  """The shape a blob shows and how much of it is there: (shape, completeness).

  Every shape is placed at the side of the blob's longer box side, at each position covering the
  blob's box. A blob that some shape matches closely (IoU >= 0.8) is that shape, complete or
  nearly; otherwise it is an incomplete `wanted` shape if it lies inside one, else the
  best-matching shape.
  """
  ys, xs = np.nonzero(pixels)
  top, left = ys.min(), xs.min()
  height, width = ys.max() - top + 1, xs.max() - left + 1
  side = max(height, width)
  blob = pixels[top : top + height, left : left + width]
  area = float(blob.sum())
  fits = {}  # shape -> (IoU, part of the blob inside, part of the shape filled)
  for shape in scenes.SHAPES:
    template = scenes.shape_mask(shape, side)
    best = (-1.0, 0.0, 0.0)
    for dy in range(side - height + 1):
      for dx in range(side - width + 1):
        placed = template[dy : dy + height, dx : dx + width]
        inter = float((placed & blob).sum())
        iou = inter / (area + float(template.sum()) - inter)
        best = max(best, (iou, inter / area, inter / float(template.sum())))
    fits[shape] = best
  closest = max(fits, key=lambda s: fits[s][0])
  if fits[closest][0] >= 0.8:
    return closest, fits[closest][2]
  if fits[wanted][1] >= 0.9:
    return wanted, fits[wanted][2]
  return closest, fits[closest][2]
