"""Toy scenes: flat backgrounds and a few coloured shapes, rendered pixel-exactly.

A scene is a small frozen dataclass, so an edit is a new scene and "the perfect edit" is simply the
rendering of the edited scene. Colours come from two disjoint named palettes (objects, backgrounds),
shapes never touch, and nothing is anti-aliased: every pixel of a rendering is a palette colour
(after the scene's global tone), which is what lets the judge recover a scene exactly from its image.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
from scipy import ndimage

SHAPES = ("circle", "square", "triangle")

# Saturated object colours and unsaturated / pastel background colours, chosen far apart in RGB (the
# closest pair is > 90 apart) so a noisy or blurry pixel still has an unambiguous nearest name.
OBJECT_COLOURS = {
    "red": (210, 30, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 125, 20),
}
BACKGROUND_COLOURS = {
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "grey": (128, 128, 128),
    "pink": (240, 150, 190),
    "cyan": (70, 200, 210),
}
COLOURS = {**OBJECT_COLOURS, **BACKGROUND_COLOURS}

# Global tones are the "global" edits: a fixed per-colour transform applied when rendering.
TONES = ("none", "darker", "lighter", "greyscale")
SPLITS = ("none", "horizontal", "vertical")  # horizontal: top half / bottom half

MIN_GAP = 2  # empty pixels kept between any two objects (and for added objects) in a scene


def tone_pixels(rgb, tone: str) -> np.ndarray:
  """The colours of `rgb` (uint8 [..., 3]) under a global tone; integer-exact so renderings stay exact."""
  rgb = np.asarray(rgb, np.int32)
  if tone == "none":
    out = rgb
  elif tone == "darker":
    out = rgb // 2
  elif tone == "lighter":
    out = 255 - (255 - rgb) // 2
  elif tone == "greyscale":
    luma = (299 * rgb[..., 0] + 587 * rgb[..., 1] + 114 * rgb[..., 2] + 500) // 1000
    out = np.repeat(luma[..., None], 3, axis=-1)
  else:
    raise ValueError(f"unknown tone {tone!r}; expected one of {TONES}")
  return out.astype(np.uint8)


def tone_colour(rgb, tone: str) -> tuple[int, int, int]:
  return tuple(int(c) for c in tone_pixels(rgb, tone))


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """A filled shape inside the square box [top, top + size) x [left, left + size)."""

  shape: str
  colour: str
  top: int
  left: int
  size: int

  @property
  def name(self) -> str:
    return f"{self.colour} {self.shape}"

  def moved(self, dy: int, dx: int) -> "SceneObject":
    return dataclasses.replace(self, top=self.top + dy, left=self.left + dx)


@dataclasses.dataclass(frozen=True)
class Background:
  """One colour (split "none") or two colours split into halves."""

  colours: tuple[str, ...]
  split: str = "none"

  def __post_init__(self):
    if self.split not in SPLITS:
      raise ValueError(f"unknown background split {self.split!r}")
    if len(self.colours) != (1 if self.split == "none" else 2):
      raise ValueError(
          f"background split {self.split!r} needs "
          f"{1 if self.split == 'none' else 2} colours, got {self.colours}"
      )

  @property
  def name(self) -> str:
    return " and ".join(self.colours)


@dataclasses.dataclass(frozen=True)
class Scene:
  size: int
  background: Background
  objects: tuple[SceneObject, ...]
  tone: str = "none"

  def find(self, colour: str, shape: str) -> Optional[SceneObject]:
    for obj in self.objects:
      if obj.colour == colour and obj.shape == shape:
        return obj
    return None


def shape_mask(shape: str, size: int) -> np.ndarray:
  """Boolean [size, size] mask of a shape filling its box (touching all four sides)."""
  centres = np.arange(size) + 0.5
  rows, cols = np.meshgrid(centres, centres, indexing="ij")
  half = size / 2
  if shape == "square":
    return np.ones((size, size), bool)
  if shape == "circle":
    return (rows - half) ** 2 + (cols - half) ** 2 <= half**2
  if shape == "triangle":  # apex up; row i spans half-width (i + 1) / 2 around the centre
    return np.abs(cols - half) <= (rows + 0.5) / 2
  raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def object_mask(obj: SceneObject, image_size: int) -> np.ndarray:
  mask = np.zeros((image_size, image_size), bool)
  mask[obj.top : obj.top + obj.size, obj.left : obj.left + obj.size] = shape_mask(
      obj.shape, obj.size
  )
  return mask


def background_part_masks(background: Background, size: int) -> list[np.ndarray]:
  """One boolean mask per background colour (before objects are drawn over it)."""
  if background.split == "none":
    return [np.ones((size, size), bool)]
  first = np.zeros((size, size), bool)
  if background.split == "horizontal":
    first[: size // 2] = True
  else:
    first[:, : size // 2] = True
  return [first, ~first]


def render_labels(scene: Scene) -> np.ndarray:
  """int [size, size] map: -1 - k for background part k, i >= 0 for object i."""
  labels = np.zeros((scene.size, scene.size), np.int32)
  for k, part in enumerate(background_part_masks(scene.background, scene.size)):
    labels[part] = -1 - k
  for i, obj in enumerate(scene.objects):
    labels[object_mask(obj, scene.size)] = i
  return labels


def render(scene: Scene) -> np.ndarray:
  """uint8 [size, size, 3] image of the scene."""
  labels = render_labels(scene)
  image = np.zeros((scene.size, scene.size, 3), np.uint8)
  for k, colour in enumerate(scene.background.colours):
    image[labels == -1 - k] = tone_colour(COLOURS[colour], scene.tone)
  for i, obj in enumerate(scene.objects):
    image[labels == i] = tone_colour(COLOURS[obj.colour], scene.tone)
  return image


def object_size_range(image_size: int) -> tuple[int, int]:
  """Smallest and largest object box side for an image size (shapes stay recognisable at 5 px)."""
  return max(5, round(0.22 * image_size)), max(6, round(0.36 * image_size))


def boxes_clear(a: SceneObject, b: SceneObject, gap: int = MIN_GAP) -> bool:
  """True when the boxes of a and b are at least `gap` pixels apart."""
  return (
      a.top + a.size + gap <= b.top
      or b.top + b.size + gap <= a.top
      or a.left + a.size + gap <= b.left
      or b.left + b.size + gap <= a.left
  )


def place_object(
    rng: np.random.Generator,
    scene: Scene,
    shape: str,
    colour: str,
    ignore: Optional[SceneObject] = None,
    tries: int = 50,
) -> Optional[SceneObject]:
  """A new object at a random free place in `scene` (None if none was found)."""
  low, high = object_size_range(scene.size)
  others = [o for o in scene.objects if o is not ignore]
  for _ in range(tries):
    size = int(rng.integers(low, high + 1))
    top, left = (int(v) for v in rng.integers(0, scene.size - size + 1, size=2))
    candidate = SceneObject(shape, colour, top, left, size)
    if all(boxes_clear(candidate, o) for o in others):
      return candidate
  return None


def random_scene(
    rng: np.random.Generator,
    size: int = 32,
    max_objects: int = 3,
    min_objects: int = 1,
    two_tone_prob: float = 0.3,
) -> Scene:
  """A random scene; objects have distinct (colour, shape) pairs so each can be named uniquely."""
  if two_tone_prob > 0 and rng.random() < two_tone_prob:
    colours = rng.choice(list(BACKGROUND_COLOURS), size=2, replace=False)
    background = Background(tuple(str(c) for c in colours), str(rng.choice(SPLITS[1:])))
  else:
    background = Background((str(rng.choice(list(BACKGROUND_COLOURS))),))
  scene = Scene(size, background, ())
  wanted = int(rng.integers(min_objects, max_objects + 1))
  while len(scene.objects) < wanted:
    taken = {(o.colour, o.shape) for o in scene.objects}
    colour, shape = str(rng.choice(list(OBJECT_COLOURS))), str(rng.choice(SHAPES))
    if (colour, shape) in taken:
      continue
    obj = place_object(rng, scene, shape, colour)
    if obj is None:  # crowded: keep the objects placed so far unless below the minimum
      if len(scene.objects) >= min_objects:
        break
      scene = Scene(size, background, ())
      continue
    scene = dataclasses.replace(scene, objects=scene.objects + (obj,))
  return scene


def recover_scene(image) -> Scene:
  """The scene a clean (palette-exact, untoned) rendering shows; raises ValueError otherwise.

  Background: its palette colours and split. Objects: each connected component of an object colour
  is one object whose box is its bounding box and whose shape is the one rendering it exactly.
  """
  image = np.asarray(image)
  if (
      image.ndim != 3
      or image.shape[2] != 3
      or image.shape[0] != image.shape[1]
      or image.dtype != np.uint8
  ):
    raise ValueError(
        f"a toy scene image is a square uint8 [n, n, 3] array, got " f"{image.dtype} {image.shape}"
    )
  size = image.shape[0]
  names = list(COLOURS)
  palette = np.array([COLOURS[n] for n in names], np.int32)
  matches = np.all(image[:, :, None, :].astype(np.int32) == palette[None, None], axis=-1)
  if not np.all(matches.any(-1)):
    raise ValueError(
        f"the original is not a clean toy scene: {int((~matches.any(-1)).sum())} "
        "pixels are not palette colours"
    )
  index = matches.argmax(-1)
  colour_of = np.array(names)[index]

  objects = []
  for colour in OBJECT_COLOURS:
    components, count = ndimage.label(colour_of == colour)
    for k in range(1, count + 1):
      ys, xs = np.nonzero(components == k)
      top, left = int(ys.min()), int(xs.min())
      side = int(ys.max()) - top + 1
      if int(xs.max()) - left + 1 != side:
        raise ValueError(f"the {colour} region at ({top}, {left}) is not a toy shape")
      patch = components[top : top + side, left : left + side] == k
      shape = next((s for s in SHAPES if np.array_equal(shape_mask(s, side), patch)), None)
      if shape is None:
        raise ValueError(f"the {colour} region at ({top}, {left}) is not a toy shape")
      objects.append(SceneObject(shape, colour, top, left, side))
  objects.sort(key=lambda o: (o.top, o.left))

  background = _recover_background(colour_of, size)
  scene = Scene(size, background, tuple(objects))
  if not np.array_equal(render(scene), image):
    raise ValueError(
        "the original is not a clean toy scene (objects overlap or the background "
        "is not a plain or two-tone one)"
    )
  return scene


def _recover_background(colour_of: np.ndarray, size: int) -> Background:
  is_background = np.isin(colour_of, list(BACKGROUND_COLOURS))
  for split in SPLITS:
    parts = background_part_masks(
        Background(("white",) * (1 if split == "none" else 2), split), size
    )
    colours = []
    for part in parts:
      seen = set(colour_of[part & is_background].tolist())
      if len(seen) != 1:
        break
      colours.append(seen.pop())
    else:
      if split == "none" or colours[0] != colours[1]:
        return Background(tuple(colours), split)
  raise ValueError("the original's background is neither plain nor two-tone")
