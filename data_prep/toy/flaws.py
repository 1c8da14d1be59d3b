"""Flawed edit targets, as in InstructPix2Pix data: the perfect edit damaged by sampled failure modes.

Each of the three perspectives independently carries at most one flaw, with a probability and a
per-mode weight from `FlawMix`, and a severity in (0, 1] that scales how visible the flaw is:

  following:  wrong_colour (the right change in the wrong colour / tone), partial_edit (a part of
              the edited region, a fraction `severity`, keeps its original look), wrong_object (the
              change lands on another object, or an added object has the wrong shape), no_change.
  preserving: background_shift (the untouched background is tinted by 20-80 RGB units, keeping its
              colour name), object_moved (another object moves by 2-4 px), object_recoloured
              (another object changes colour), also_edited (the instructed recolouring or removal
              lands on another object as well as on the target: an edit that leaks, the commonest
              way a toy editor failed to preserve; only where the target is edited right).
  quality:    noise (Gaussian, sigma 10-40), blur (Gaussian, sigma 0.4-1.2 px), blockiness
              (brightness offsets of 3-20 on an aligned grid of image_size / 8 blocks), banding
              (the brightness falls into 4 stripes, +-6 to +-20).

Following and preserving flaws change the scene (so they are exact); partial edits, background
tints and quality flaws change pixels. Modes that cannot apply to a sample (no other object to move,
no colour in a global edit...) are skipped in favour of the applicable ones.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import numpy as np
from scipy import ndimage

from data_prep.toy import instructions, scenes
from data_prep.toy.instructions import Edit
from data_prep.toy.scenes import Scene

PERSPECTIVES = ("following", "preserving", "quality")
MODES = {
    "following": ("wrong_colour", "partial_edit", "wrong_object", "no_change"),
    "preserving": ("background_shift", "object_moved", "object_recoloured", "also_edited"),
    "quality": ("noise", "blur", "blockiness", "banding"),
}


def _uniform(modes):
  return {m: 1.0 for m in modes}


@dataclasses.dataclass(frozen=True)
class FlawMix:
  """How flaws are sampled: probability per perspective, relative weight per mode, severities.

  With the defaults 1 - 0.6 ** 3 = 78% of the samples carry at least one flaw.
  """

  following_prob: float = 0.4
  preserving_prob: float = 0.4
  quality_prob: float = 0.4
  following_weights: Mapping[str, float] = dataclasses.field(
      default_factory=lambda: _uniform(MODES["following"])
  )
  preserving_weights: Mapping[str, float] = dataclasses.field(
      default_factory=lambda: _uniform(MODES["preserving"])
  )
  quality_weights: Mapping[str, float] = dataclasses.field(
      default_factory=lambda: _uniform(MODES["quality"])
  )
  min_severity: float = 0.2
  max_severity: float = 1.0

  def __post_init__(self):
    for p in PERSPECTIVES:
      if not 0.0 <= self.prob(p) <= 1.0:
        raise ValueError(f"{p}_prob must be in [0, 1], got {self.prob(p)}")
      unknown = set(self.weights(p)) - set(MODES[p])
      if unknown:
        raise ValueError(f"unknown {p} flaw modes {sorted(unknown)}; known: {MODES[p]}")
    if not 0.0 < self.min_severity <= self.max_severity <= 1.0:
      raise ValueError("severities must satisfy 0 < min_severity <= max_severity <= 1")

  def prob(self, perspective: str) -> float:
    return getattr(self, f"{perspective}_prob")

  def weights(self, perspective: str) -> Mapping[str, float]:
    return getattr(self, f"{perspective}_weights")


NO_FLAWS = FlawMix(following_prob=0.0, preserving_prob=0.0, quality_prob=0.0)


@dataclasses.dataclass(frozen=True)
class Flaw:
  perspective: str
  mode: str
  severity: float


@dataclasses.dataclass(frozen=True)
class FlawedTarget:
  image: np.ndarray  # uint8 [n, n, 3]
  flaws: dict  # perspective -> Flaw or None


DISCRETE_MODES = (  # severity 1
    "wrong_colour",
    "wrong_object",
    "no_change",
    "object_recoloured",
    "also_edited",
)


def make_flawed_target(
    rng: np.random.Generator,
    original: Scene,
    sample: instructions.EditSample,
    mix: FlawMix,
    forced: Optional[Mapping[str, Optional[str]]] = None,
) -> FlawedTarget:
  """The perfect edit of `sample`, damaged by flaws drawn from `mix`.

  `forced` maps a perspective to the one mode to use (None: no flaw there), drawn with certainty;
  the judge report uses it to measure each mode on its own. A forced mode that cannot apply to
  the sample leaves that perspective unflawed.
  """
  forced = dict(forced or {})

  def modes_to_try(perspective):
    if perspective in forced:
      return [forced[perspective]] if forced[perspective] else []
    if rng.random() >= mix.prob(perspective):
      return []
    return _weighted_order(rng, mix.weights(perspective))

  def severity(mode):
    return (
        1.0
        if mode in DISCRETE_MODES
        else round(float(rng.uniform(mix.min_severity, mix.max_severity)), 3)
    )

  flaws = dict.fromkeys(PERSPECTIVES)
  # Scene level: `after` is the (mis)edited scene, `before` the unedited one a partial edit falls
  # back to; a disturbed untouched object is disturbed in both.
  before, after = original, sample.edited_scene
  for mode in modes_to_try("following"):
    mis_edited = after if mode == "partial_edit" else _mis_edit(rng, original, sample, mode)
    if mis_edited is not None:
      flaws["following"], after = Flaw("following", mode, severity(mode)), mis_edited
      break
  for mode in modes_to_try("preserving"):
    if mode == "background_shift":
      # A background or global edit changes the background itself: no untouched one to shift.
      if sample.edit.category not in ("background", "global"):
        flaws["preserving"] = Flaw("preserving", mode, severity(mode))
        break
      continue
    if mode == "also_edited":
      # The target must be edited right, or the judge reads the other object's change as the
      # edit landing there instead of on the target (a following matter).
      also = None if flaws["following"] else _also_edit_another(rng, after, sample.edit)
      if also is not None:
        after, flaws["preserving"] = also, Flaw("preserving", mode, severity(mode))
        break
      continue
    disturbed = _disturb_other_object(rng, before, after, sample.edit, mode, severity(mode))
    if disturbed is not None:
      (before, after), flaws["preserving"] = disturbed[:2], disturbed[2]
      break
  for mode in modes_to_try("quality"):
    flaws["quality"] = Flaw("quality", mode, severity(mode))
    break

  # Pixel level.
  image = scenes.render(after).astype(np.float32)
  undone = np.zeros(image.shape[:2], bool)
  following, preserving = flaws["following"], flaws["preserving"]
  if following and following.mode == "partial_edit":
    undone = _part_to_undo(rng, image, scenes.render(before).astype(np.float32), following.severity)
    image[undone] = scenes.render(before)[undone]
  if preserving and preserving.mode == "background_shift":
    image = _tint(rng, image, (scenes.render_labels(after) < 0) & ~undone, preserving.severity)
  if flaws["quality"]:
    image = _degrade(rng, image, flaws["quality"])
  return FlawedTarget(np.clip(np.round(image), 0, 255).astype(np.uint8), flaws)


def _weighted_order(rng, weights: Mapping[str, float]) -> list[str]:
  """Modes with positive weight in a random order, drawn by weight without replacement."""
  modes = [m for m, w in weights.items() if w > 0]
  order = []
  while modes:
    p = np.array([weights[m] for m in modes], np.float64)
    order.append(modes.pop(int(rng.choice(len(modes), p=p / p.sum()))))
  return order


def _mis_edit(rng, original: Scene, sample: instructions.EditSample, mode: str) -> Optional[Scene]:
  """The scene a wrong_colour / wrong_object / no_change edit produces (None: not applicable)."""
  edit = sample.edit
  if mode == "no_change":
    return original
  taken = {(o.colour, o.shape) for o in original.objects}
  if mode == "wrong_colour":
    if edit.category == "local":
      target = original.find(edit.colour, edit.shape)
      colours = [
          c
          for c in scenes.OBJECT_COLOURS
          if c not in (edit.colour, edit.new_colour) and (c, edit.shape) not in taken
      ]
      return _recolour(original, target, _pick(rng, colours)) if colours else None
    if edit.category == "add":
      added = sample.edited_scene.objects[-1]
      colours = [
          c for c in scenes.OBJECT_COLOURS if c != edit.colour and (c, edit.shape) not in taken
      ]
      if not colours:
        return None
      return _replace_last(
          sample.edited_scene, dataclasses.replace(added, colour=_pick(rng, colours))
      )
    if edit.category == "background":
      current = original.background.colours if original.background.split == "none" else ()
      colours = [c for c in scenes.BACKGROUND_COLOURS if c != edit.new_colour and c not in current]
      return dataclasses.replace(
          sample.edited_scene, background=scenes.Background((_pick(rng, colours),))
      )
    if edit.category == "global":
      tones = [
          t
          for t in scenes.TONES[1:]
          if t != edit.tone and instructions.tone_is_visible(original, t)
      ]
      return dataclasses.replace(original, tone=_pick(rng, tones)) if tones else None
    return None
  if mode == "wrong_object":
    if edit.category in ("local", "remove"):
      target = original.find(edit.colour, edit.shape)
      others = [o for o in original.objects if o is not target]
      if not others:
        return None
      victim = others[int(rng.integers(len(others)))]
      if edit.category == "local":
        return _recolour(original, victim, edit.new_colour)
      return _remove(original, victim)
    if edit.category == "add":
      added = sample.edited_scene.objects[-1]
      shapes = [s for s in scenes.SHAPES if s != edit.shape and (edit.colour, s) not in taken]
      if not shapes:
        return None
      return _replace_last(
          sample.edited_scene, dataclasses.replace(added, shape=_pick(rng, shapes))
      )
    return None
  raise ValueError(f"unknown following flaw {mode!r}")


def _pick(rng, options):
  return options[int(rng.integers(len(options)))]


def _recolour(scene: Scene, obj, colour: str) -> Scene:
  return dataclasses.replace(
      scene,
      objects=tuple(
          dataclasses.replace(o, colour=colour) if o is obj else o for o in scene.objects
      ),
  )


def _remove(scene: Scene, obj) -> Scene:
  return dataclasses.replace(scene, objects=tuple(o for o in scene.objects if o is not obj))


def _replace_last(scene: Scene, obj) -> Scene:
  return dataclasses.replace(scene, objects=scene.objects[:-1] + (obj,))


def _untouched_objects(edit: Edit, scene: Scene):
  """Objects of `scene` that the instruction does not touch."""
  if edit.category in ("local", "remove"):
    return [o for o in scene.objects if (o.colour, o.shape) != (edit.colour, edit.shape)]
  return list(scene.objects)


def _disturb_other_object(rng, before: Scene, after: Scene, edit: Edit, mode: str, severity: float):
  """(before, after, flaw) with an untouched object moved or recoloured in both; None if impossible."""
  candidates = [o for o in _untouched_objects(edit, before) if o in after.objects]
  order = rng.permutation(len(candidates))
  for i in order:
    victim = candidates[int(i)]
    if mode == "object_recoloured":
      taken = {(o.colour, o.shape) for o in before.objects + after.objects}
      # Never the instructed colour: that would read as the edit landing on the wrong object.
      colours = [
          c
          for c in scenes.OBJECT_COLOURS
          if c not in (victim.colour, edit.colour, edit.new_colour)
          and (c, victim.shape) not in taken
      ]
      if colours:
        colour = _pick(rng, colours)
        return (
            _recolour(before, victim, colour),
            _recolour(after, victim, colour),
            Flaw("preserving", mode, severity),
        )
    elif mode == "object_moved":
      distance = int(round(2 + 2 * severity))
      directions = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
      for k in rng.permutation(len(directions)):
        dy, dx = (distance * d for d in directions[int(k)])
        moved = victim.moved(dy, dx)
        inside = (
            0 <= moved.top
            and moved.top + moved.size <= before.size
            and 0 <= moved.left
            and moved.left + moved.size <= before.size
        )
        clear = all(
            scenes.boxes_clear(moved, o, gap=1)
            for o in before.objects + after.objects
            if o != victim
        )
        if inside and clear:
          swap = lambda s: dataclasses.replace(
              s, objects=tuple(moved if o == victim else o for o in s.objects)
          )
          return swap(before), swap(after), Flaw("preserving", mode, severity)
    else:
      raise ValueError(f"unknown preserving flaw {mode!r}")
  return None


def _also_edit_another(rng, after: Scene, edit: Edit) -> Optional[Scene]:
  """`after` with the instructed recolouring or removal applied to an untouched object as well
  (None: not a local or remove edit, or no object it can land on)."""
  if edit.category not in ("local", "remove"):
    return None
  candidates = _untouched_objects(edit, after)
  if edit.category == "local":
    taken = {(o.colour, o.shape) for o in after.objects}
    candidates = [
        o
        for o in candidates
        if o.colour != edit.new_colour and (edit.new_colour, o.shape) not in taken
    ]
  if not candidates:
    return None
  victim = candidates[int(rng.integers(len(candidates)))]
  if edit.category == "local":
    return _recolour(after, victim, edit.new_colour)
  return _remove(after, victim)


def _part_to_undo(rng, edited: np.ndarray, unedited: np.ndarray, fraction: float) -> np.ndarray:
  """Mask of a `fraction` of the changed pixels, cut from the top, bottom, left or right."""
  changed = np.any(edited != unedited, axis=-1)
  undo = np.zeros_like(changed)
  ys, xs = np.nonzero(changed)
  if len(ys):
    axis_values = [ys, -ys, xs, -xs][int(rng.integers(4))]
    cut = np.quantile(axis_values, fraction)
    undo[ys[axis_values <= cut], xs[axis_values <= cut]] = True
  return undo


def _tint(rng, image: np.ndarray, mask: np.ndarray, severity: float) -> np.ndarray:
  """Shifts the colour of the masked pixels by 20-80 RGB units.

  The direction is one that keeps every masked colour nearest to its own name (a shift must not
  turn a grey background into another palette colour) and inside [0, 255]; if none does at this
  length, shorter shifts are tried.
  """
  colours = np.unique(image[mask].reshape(-1, 3), axis=0) if mask.any() else np.zeros((0, 3))
  palette = np.array(list(scenes.COLOURS.values()), np.float32)
  length = 20 + 60 * severity
  for _ in range(4):
    for _ in range(30):
      direction = rng.normal(size=3)
      offset = direction / np.linalg.norm(direction) * length
      shifted = colours + offset
      if np.any(shifted < 0) or np.any(shifted > 255):
        continue
      distances = np.linalg.norm(shifted[:, None] - palette[None], axis=-1)
      own = np.linalg.norm(colours[:, None] - palette[None], axis=-1).argmin(1)
      nearest_other = np.where(
          np.arange(len(palette))[None] == own[:, None], np.inf, distances
      ).min(1)
      if np.all(distances[np.arange(len(colours)), own] + 20 < nearest_other):
        out = image.copy()
        out[mask] += offset
        return out
    length *= 0.75
  # Nothing kept the names (not seen in practice): shift towards mid-grey, still visibly.
  out = image.copy()
  towards = 128.0 - image[mask].mean(0)
  out[mask] += towards / max(np.linalg.norm(towards), 1e-6) * 20.0
  return out


def _degrade(rng, image: np.ndarray, flaw: Flaw) -> np.ndarray:
  s, size = flaw.severity, image.shape[0]
  if flaw.mode == "noise":
    return image + rng.normal(scale=10 + 30 * s, size=image.shape)
  if flaw.mode == "blur":
    return ndimage.gaussian_filter(image, sigma=(0.4 + 0.8 * s, 0.4 + 0.8 * s, 0), mode="nearest")
  if flaw.mode == "blockiness":
    block = block_size(size)
    cells = -(-size // block)
    amplitude = 6 + 14 * s
    offsets = rng.choice([-1.0, 1.0], size=(cells, cells)) * rng.uniform(
        0.5, 1.0, size=(cells, cells)
    )
    grid = np.kron(offsets * amplitude, np.ones((block, block)))[:size, :size]
    return image + grid[:, :, None]
  if flaw.mode == "banding":
    bands = 4
    levels = np.linspace(-1.0, 1.0, bands) * (6 + 14 * s)
    profile = levels[np.minimum(np.arange(size) * bands // size, bands - 1)]
    if rng.random() < 0.5:
      profile = profile[::-1]
    stripes = profile[:, None] if rng.random() < 0.5 else profile[None, :]
    return image + np.broadcast_to(stripes, (size, size))[:, :, None]
  raise ValueError(f"unknown quality flaw {flaw.mode!r}")


def block_size(image_size: int) -> int:
  """Side of the blockiness grid cells: 4 px at 32 px, never below 2."""
  return max(2, image_size // 8)
