"""The edit view: one (instruction, original, edited) triple and the measurements that instruction
following and detail preserving share (where the instruction acts, the tones shown, the untouched
objects found again, new shapes on the background)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
from PIL import Image
from scipy import ndimage

from data_prep.toy import instructions, scenes
from data_prep.toy.judge.measure import (
    TONED_PALETTES,
    Palette,
    colour_distance,
    denoise,
    dilate,
    erode,
    fit_shape,
    majority,
    nearest,
    to_rgb_array,
)
from data_prep.toy.judge.verdicts import DONE_COVERAGE


class cached_per_view:  # pylint: disable=invalid-name
  """A property computed once per view and kept in the view's __dict__, without a lock.

  Not functools.cached_property: on Python 3.11 it holds one RLock per property *for every
  instance*, so the judge server's threads, each on its own view, deadlocked when one held
  `added` waiting for `new_shapes` while another held them the other way round (the CI hang of
  tests/data_prep/test_annotation.py). A view is used by one thread, so no lock is needed.
  """

  def __init__(self, compute):
    self.compute = compute
    self.name = compute.__name__
    self.__doc__ = compute.__doc__

  def __set_name__(self, owner, name):
    self.name = name

  def __get__(self, view, owner=None):
    if view is None:
      return self
    value = self.compute(view)
    view.__dict__[self.name] = value  # read from there from now on (a non-data descriptor)
    return value


CHANGED = 40.0  # RGB distance from which a pixel counts as changed by the instruction


@dataclasses.dataclass(frozen=True, eq=False)  # compared by identity
class ObjectSeen:
  """An untouched object of the original as found in the edited image."""

  obj: scenes.SceneObject
  status: str  # "kept", "moved", "recoloured" or "missing"
  shift: float = 0.0
  observed: Optional[str] = None  # the colour a recoloured object shows
  pixels: Optional[np.ndarray] = None  # where the object is now (bool [n, n]), if found


class EditView:
  """One (instruction, original, edited) triple and the measurements both perspectives share."""

  def __init__(self, instruction: str, original, edited):
    self.original = to_rgb_array(original, "original image")
    self.scene = scenes.recover_scene(self.original)
    self.edit = instructions.parse_instruction(instruction)
    instructions.check_applicable(self.edit, self.scene)
    edited = to_rgb_array(edited, "edited image")
    if edited.shape != self.original.shape:  # model outputs may come at another resolution
      edited = np.asarray(
          Image.fromarray(edited).resize(self.original.shape[1::-1], Image.BILINEAR)
      )
    self.edited_uint8 = edited
    self.smooth = denoise(edited.astype(np.float32))
    self.size = self.original.shape[0]
    self.labels = scenes.render_labels(self.scene)
    self.objects_mask = self.labels >= 0
    if self.edit.category == "add":
      self.ideal = None
    else:
      ideal_scene = instructions.apply_edit(self.scene, self.edit)
      self.ideal = scenes.render(ideal_scene).astype(np.float32)

  # --- where the instruction acts --------------------------------------------------------

  @cached_per_view
  def region(self) -> np.ndarray:
    """Pixels the instruction changes (for an add: the added shape found in the edited image)."""
    if self.edit.category == "add":
      found = self.added
      return found["pixels"] if found else np.zeros(self.labels.shape, bool)
    change = np.linalg.norm(self.ideal - self.original.astype(np.float32), axis=-1)
    return change >= CHANGED

  @cached_per_view
  def target(self) -> Optional[scenes.SceneObject]:
    if self.edit.category in ("local", "remove"):
      return self.scene.find(self.edit.colour, self.edit.shape)
    return None

  @cached_per_view
  def tone_seen(self) -> str:
    """For a global edit: the tone most pixels of the region show."""
    tones = self.pixel_tones(erode(self.region))
    return majority(tones.tolist()) or "none"

  def pixel_tones(self, mask: np.ndarray) -> np.ndarray:
    """Per masked pixel: the tone it shows.

    Read against the tones of the pixel's original colour; a pixel that shows none of them
    (an object moved away, say: a preserving matter) is read against every named colour.
    """
    pixels = self.smooth[mask]
    own = np.stack(
        [scenes.tone_pixels(self.original[mask], t).astype(np.float32) for t in scenes.TONES], 1
    )
    to_own = np.linalg.norm(pixels[:, None] - own, axis=-1)  # [N, tones]
    to_any = np.stack([nearest(pixels, palette)[1] for palette in TONED_PALETTES], 1)
    distances = np.where(to_own.min(1, keepdims=True) < 60.0, to_own, to_any)
    return np.array(scenes.TONES)[distances.argmin(1)]

  @cached_per_view
  def acceptable_tones(self) -> tuple[str, ...]:
    """Tones untouched things may show: any for a global edit, so partial or wrong tones stay
    a following matter; otherwise none."""
    if self.edit.category != "global":
      return ("none",)
    return tuple(
        dict.fromkeys(t for t in ("none", self.edit.tone, self.tone_seen) if t in scenes.TONES)
    )

  @cached_per_view
  def inner_region(self) -> np.ndarray:
    """The changed region a pixel or two in from its border (a blurry border is a quality
    matter)."""
    inner = erode(self.region)
    deeper = erode(inner)
    return deeper if deeper.sum() >= 4 else inner

  @cached_per_view
  def target_coverage(self) -> float:
    """The share of the inner changed region that shows the instructed change (not for an add:
    its following reads the added shape)."""
    if self.edit.category == "add":
      raise ValueError("an add has no fixed region; its following reads the added shape")
    inner = self.inner_region
    if self.edit.category == "global":
      done = self.pixel_tones(inner) == self.edit.tone
    else:
      done = self.nearer_ideal(inner)
    return float(done.mean()) if done.size else 1.0

  def nearer_ideal(self, mask: np.ndarray) -> np.ndarray:
    """Per masked pixel: is the edited colour nearer the ideal than the original / any name?"""
    pixels, ideal = self.smooth[mask], self.ideal[mask]
    to_ideal = np.linalg.norm(pixels - ideal, axis=-1)
    others = [self.original[mask].astype(np.float32)]
    others += [np.broadcast_to(np.float32(rgb), pixels.shape) for rgb in scenes.COLOURS.values()]
    to_other = np.full(to_ideal.shape, np.inf, np.float32)
    for other in others:
      same_as_ideal = np.all(np.abs(other - ideal) < 1, axis=-1)
      distance = np.linalg.norm(pixels - other, axis=-1)
      to_other = np.minimum(to_other, np.where(same_as_ideal, np.inf, distance))
    return to_ideal < to_other

  @cached_per_view
  def misdirected(self) -> list[ObjectSeen]:
    """Untouched objects that received the instructed change *instead of* the target: only while
    the target itself is not done. Where it is done, another object recoloured or removed too is
    an unintended change (a preserving failure): counting it here let an editor that removed
    every object of a scene pass both perspectives."""
    edit = self.edit
    if edit.category in ("local", "remove") and self.target_coverage >= DONE_COVERAGE:
      return []
    if edit.category == "local":
      return [
          s for s in self.objects_seen if s.status == "recoloured" and s.observed == edit.new_colour
      ]
    if edit.category == "remove":
      return [s for s in self.objects_seen if s.status == "missing"]
    return []

  # --- add: the background as seen, and new shapes on it ------------------------------------

  @cached_per_view
  def background_seen(self) -> list[np.ndarray]:
    """The colour each background part shows in the edited image, away from all objects.

    The median of the part's pixels whose nearest named colour is still that background's (a
    tint keeps it so), so that an added shape covering much of a small part does not count.
    """
    far = ~dilate(self.objects_mask, 2)
    palette = Palette.of(scenes.COLOURS, self.acceptable_tones)
    colours = []
    for k, name in enumerate(self.scene.background.colours):
      part = (self.labels == -1 - k) & far
      if not part.any():
        part = self.labels == -1 - k
      pixels = self.smooth[part]
      own = palette.classify(pixels) == name
      colours.append(np.median(pixels[own] if own.sum() >= 4 else pixels, axis=0))
    return colours

  @cached_per_view
  def new_shapes(self) -> list[dict]:
    """Shapes of an object colour standing on the original background, away from its objects."""
    object_names = list(scenes.OBJECT_COLOURS)
    object_rgb = np.array([scenes.COLOURS[n] for n in object_names], np.float32)
    candidate = np.zeros(self.labels.shape, bool)
    names = np.full(self.labels.shape, "", object)
    for k, background in enumerate(self.background_seen):
      part = (self.labels == -1 - k) & ~dilate(self.objects_mask, 1)
      palette = np.concatenate([background[None], object_rgb])
      index, _ = nearest(self.smooth[part], palette)
      far_from_background = np.linalg.norm(self.smooth[part] - background, axis=-1) > 50
      hit = (index > 0) & far_from_background
      ys, xs = np.nonzero(part)
      candidate[ys[hit], xs[hit]] = True
      names[ys[hit], xs[hit]] = np.array(object_names)[index[hit] - 1]
    for seen in self.objects_seen:  # a moved object is not new
      if seen.pixels is not None:
        candidate &= ~dilate(seen.pixels, 1)
    components, count = ndimage.label(candidate, structure=np.ones((3, 3), bool))
    background_map = np.zeros(self.smooth.shape, np.float32)
    for k, background in enumerate(self.background_seen):
      background_map[self.labels == -1 - k] = background
    raw = self.edited_uint8.astype(np.float32)
    shapes = []
    for k in range(1, count + 1):
      pixels = ndimage.binary_fill_holes(components == k)
      # Too small or too thin for a toy shape: noise, or a blurred edge between two colours.
      if (
          pixels.sum() < 8
          or not ndimage.binary_erosion(pixels, structure=np.ones((3, 3), bool)).any()
      ):
        continue
      # Named from the component's own pixels: the holes filled above have no colour name.
      colour = majority(names[components == k].tolist())
      # The median wears corners off a shape that is not pixel-exact: give back the border
      # pixels nearer the shape's colour than the background's that sit in a corner of the
      # shape (two sides touching it; a noisy pixel beside a flat side touches one).
      to_shape = np.linalg.norm(raw - np.float32(scenes.COLOURS[colour]), axis=-1)
      shape_like = (
          (to_shape < np.linalg.norm(raw - background_map, axis=-1))
          & (self.labels < 0)
          & ~dilate(self.objects_mask, 1)
      )
      cross = ndimage.generate_binary_structure(2, 1)
      for _ in range(2):
        touching = ndimage.convolve(
            pixels.astype(np.int32), cross.astype(np.int32), mode="constant"
        )
        pixels = pixels | (shape_like & ~pixels & (touching >= 2))
      shape, completeness = fit_shape(pixels, self.edit.shape or scenes.SHAPES[0])
      shapes.append(
          {
              "pixels": pixels,
              "colour": colour,
              "shape": shape,
              "completeness": completeness,
              "area": int(pixels.sum()),
          }
      )
    return shapes

  @cached_per_view
  def added(self) -> Optional[dict]:
    """The new shape taken as the added object: the requested colour first, then the largest."""
    if not self.new_shapes:
      return None
    return max(self.new_shapes, key=lambda s: (s["colour"] == self.edit.colour, s["area"]))

  # --- the untouched objects, found again ------------------------------------------------------

  @cached_per_view
  def objects_seen(self) -> list[ObjectSeen]:
    untouched = [o for o in self.scene.objects if o is not self.target]
    return [self._find_object(o) for o in untouched]

  def _find_object(self, obj: scenes.SceneObject) -> ObjectSeen:
    """Where an untouched object is in the edited image, and in which colour.

    Its old interior tells whether it changed colour (most pixels nearest another object
    colour). Otherwise the object is the component of pixels nearer its own colour than the
    background's that overlaps its old place most (or lies nearest to it), never on top of
    another original object; its centroid shift tells whether it moved.
    """
    n, margin = self.size, 6
    top, left = max(0, obj.top - margin), max(0, obj.left - margin)
    bottom, right = min(n, obj.top + obj.size + margin), min(n, obj.left + obj.size + margin)
    window = np.zeros((n, n), bool)
    window[top:bottom, left:right] = True
    mask = scenes.object_mask(obj, n)

    tones = self.acceptable_tones
    own = np.array([scenes.tone_colour(scenes.COLOURS[obj.colour], t) for t in tones], np.float32)
    # The scene's background colours (as expected and as seen) always count as background; other
    # background colours only where they cannot pass for the object (a grey object under the
    # greyscale tone is not the grey background).
    background = [
        scenes.tone_colour(scenes.COLOURS[c], t)
        for c in self.scene.background.colours
        for t in tones
    ]
    background += [tuple(c) for c in np.array(self.background_seen)]
    background += [
        rgb
        for rgb in (
            scenes.tone_colour(c, t) for c in scenes.BACKGROUND_COLOURS.values() for t in tones
        )
        if colour_distance(own, np.float32(rgb)).min() >= 25.0
    ]
    background = np.array(background, np.float32)
    others = [
        (c, scenes.tone_colour(scenes.COLOURS[c], t))
        for c in scenes.OBJECT_COLOURS
        if c != obj.colour
        for t in tones
    ]
    # Another colour indistinguishable from the object's own is evidence for the object.
    others = [(c, rgb) for c, rgb in others if colour_distance(own, np.float32(rgb)).min() >= 25.0]
    other_rgb = np.array([rgb for _, rgb in others], np.float32).reshape(-1, 3)

    interior = erode(mask)
    pixels = self.smooth[interior]
    to_own = colour_distance(pixels[:, None], own[None]).min(1)
    to_background = colour_distance(pixels[:, None], background[None]).min(1)
    if len(others):
      to_others = colour_distance(pixels[:, None], other_rgb[None])
      nearest_other = np.array([c for c, _ in others])[to_others.argmin(1)]
      is_other = to_others.min(1) < np.minimum(to_own, to_background)
      if is_other.mean() > 0.5:
        return ObjectSeen(obj, "recoloured", observed=majority(nearest_other[is_other].tolist()))

    elsewhere = np.zeros((n, n), bool)
    for other in self.scene.objects:
      if other is not obj:
        elsewhere |= scenes.object_mask(other, n)
    candidates = window & ~dilate(elsewhere, 1)
    found = np.zeros((n, n), bool)
    pixels = self.smooth[candidates]
    found[candidates] = colour_distance(pixels[:, None], own[None]).min(1) < colour_distance(
        pixels[:, None], background[None]
    ).min(1)
    components, count = ndimage.label(found, structure=np.ones((3, 3), bool))
    best, best_key = None, None
    centre = np.array(np.nonzero(mask)).mean(1)
    for k in range(1, count + 1):
      component = components == k
      overlap = int((component & mask).sum())
      distance = np.linalg.norm(np.array(np.nonzero(component)).mean(1) - centre)
      key = (overlap, -distance)
      if best_key is None or key > best_key:
        best, best_key = component, key
    if best is not None and best.sum() >= 0.4 * mask.sum():
      shift = float(np.linalg.norm(np.array(np.nonzero(best)).mean(1) - centre))
      return ObjectSeen(obj, "moved" if shift >= 1.0 else "kept", shift, pixels=best)
    return ObjectSeen(obj, "missing")
