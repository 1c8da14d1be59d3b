"""The toy judge: what GPT-4o does in the paper, done by measurement in the toy world.

It sees only what GPT-4o would see, (instruction, original image, edited image), and answers the
three perspectives in the fixed order (instruction following, detail preserving, generation
quality), each as a 0-5 score, a yes/no and a short text naming what is wrong.

How it measures, so that each failure shows up on its own perspective only:
  * The original is a clean rendering, so its scene is recovered exactly; the instruction is parsed
    from the templates and the ideal edit rendered. The edited image may be anything (a flawed
    target, a blurry or noisy model output at another size): colours are read from its 3x3 vector
    median, which removes pixel noise but keeps flat regions and their edges.
  * Following is read inside the region the instruction changes, a pixel or two in from its border
    (a blurry border is a quality matter): the share of pixels nearer the ideal edit's colour than
    the original's or any other named colour (for a global edit: showing the asked tone). An add
    has no fixed place: the judge looks for a new shape on the background and checks its colour,
    its shape and how complete it is.
  * Preserving is read outside that region: every untouched object must still be where it was
    (centroid shift < 1 px) in its colour, the untouched background must keep its colour (mean
    colour error, averaged so zero-mean noise, blocks and bands cancel) and no extra shape may
    appear. An untouched object that got the instructed change instead of the target is a
    following failure ("the blue square turned red instead"), not a preserving one.
  * Quality is read from the edited image alone: the residual between it and its nearest
    palette-exact rendering, split into pixel noise (image minus its median), blur (residual left
    at colour edges), blockiness (residual constant on the aligned block grid) and banding
    (residual constant along rows or columns).
"""
from __future__ import annotations

import dataclasses
import functools
import io
from typing import Optional

import numpy as np
from PIL import Image
from scipy import ndimage

from data_prep import prompts
from data_prep.toy import flaws, instructions, scenes

PERSPECTIVES = ("following", "preserving", "quality")
NOTHING_WRONG = prompts.NOTHING_WRONG  # "no negative aspects", ... (the paper's texts)
YES_THRESHOLD = 4.0  # a perspective is a "yes" from this score on

# Every failure text the judge writes; the vocabulary of the toy world is read from these.
FAILURES = {
    # following, recolour
    "still_colour": "the {shape} is still {colour}",
    "wrong_colour": "the {shape} is {observed}, not {new_colour}",
    "part_recoloured": "only part of the {shape} turned {new_colour}",
    "misdirected_recolour": "the {colour} {shape} turned {new_colour} instead",
    # following, remove
    "still_there": "the {colour} {shape} is still there",
    "part_removed": "the {colour} {shape} is only partly removed",
    "recoloured_not_removed": "the {colour} {shape} turned {observed} instead of disappearing",
    "misdirected_remove": "the {colour} {shape} was removed instead",
    # following, add
    "not_added": "no {colour} {shape} was added",
    "added_wrong_colour": "the added {shape} is {observed}, not {colour}",
    "added_wrong_object": "a {observed} {observed_shape} was added, not a {colour} {shape}",
    "added_incomplete": "the added {shape} is incomplete",
    # following, background
    "background_unchanged": "the background is still {observed}",
    "background_wrong_colour": "the background is {observed}, not {new_colour}",
    "background_part": "only part of the background turned {new_colour}",
    # following, global
    "tone_missing": "the image is not {tone}",
    "tone_wrong": "the image is {observed_tone}, not {tone}",
    "tone_part": "only part of the image is {tone}",
    # preserving
    "background_changed": "the background colour changed",
    "object_moved": "the {colour} {shape} moved",
    "object_recoloured": "the {colour} {shape} turned {observed}",
    "object_missing": "the {colour} {shape} disappeared",
    "extra_object": "an extra {observed} object appeared",
    # quality
    "noise": "visible noise",
    "blur": "the image is blurry",
    "blockiness": "blocky artifacts",
    "banding": "colour banding",
}

_CHANGED = 40.0  # RGB distance from which a pixel counts as changed by the instruction
_DONE_COVERAGE = 0.95  # following counts as complete from this fraction of the edited region on


@dataclasses.dataclass(frozen=True)
class Verdict:
    score: float  # 0..5, one decimal
    yes: bool
    failure: str  # what is wrong, or the perspective's "nothing wrong" text


@dataclasses.dataclass(frozen=True)
class Judgement:
    following: Verdict
    preserving: Verdict
    quality: Verdict

    @property
    def verdicts(self) -> tuple[Verdict, Verdict, Verdict]:
        return (self.following, self.preserving, self.quality)

    @property
    def scores(self) -> tuple[float, float, float]:
        return tuple(v.score for v in self.verdicts)

    @property
    def failures(self) -> tuple[str, str, str]:
        return tuple(v.failure for v in self.verdicts)


def judge(instruction: str, original, edited) -> Judgement:
    """All three perspectives. Images: uint8 [H, W, 3] arrays, PIL images or PNG bytes."""
    view = _EditView(instruction, original, edited)
    return Judgement(view.following(), view.preserving(), judge_quality(view.edited_uint8))


def judge_following(instruction: str, original, edited) -> Verdict:
    return _EditView(instruction, original, edited).following()


def judge_preserving(instruction: str, original, edited) -> Verdict:
    return _EditView(instruction, original, edited).preserving()


def judge_perspective(perspective: str, instruction: str, original, edited) -> Verdict:
    if perspective == "quality":
        return judge_quality(edited)
    if perspective not in PERSPECTIVES:
        raise ValueError(f"unknown perspective {perspective!r}; expected one of {PERSPECTIVES}")
    return getattr(_EditView(instruction, original, edited), perspective)()


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
        raise ValueError(f"the {what} must be a uint8 [H, W, 3] array, a PIL image or PNG bytes, "
                         f"got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"the {what} must have dtype uint8 (0..255), got {image.dtype}; convert "
                         "model outputs first, e.g. np.round((x + 1) * 127.5).clip(0, 255).astype(np.uint8)")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 4:
        raise ValueError(f"the {what} must be an RGB image [H, W, 3], got shape {image.shape}")
    return image


# ----------------------------------------------------------------------------------------------
# Shared measurement tools.

def _median3(image: np.ndarray) -> np.ndarray:
    """3x3 vector median: each pixel becomes the window colour nearest (in summed distance) to all
    the others. Unlike a per-channel median it never invents a colour where three regions meet."""
    h, w, _ = image.shape
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    window = np.stack([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])  # [9, h, w, 3]
    spread = np.zeros((9, h, w), np.float32)
    for i in range(9):
        for j in range(i + 1, 9):
            distance = np.sqrt(((window[i] - window[j]) ** 2).sum(-1))
            spread[i] += distance
            spread[j] += distance
    return np.take_along_axis(window, spread.argmin(0)[None, :, :, None], axis=0)[0]


_UNTONED = np.array(list(scenes.COLOURS.values()), np.float32)
_TONED_PALETTES = [scenes.tone_pixels(_UNTONED.astype(np.uint8), t).astype(np.float32) for t in scenes.TONES]
_ALL_TONED_COLOURS = np.unique(np.array(
    [scenes.tone_colour(rgb, t) for rgb in scenes.COLOURS.values() for t in scenes.TONES], np.float32), axis=0)


def _denoise(image: np.ndarray) -> np.ndarray:
    """The 3x3 median of the image, except where a pixel is (almost) exactly a palette colour: a
    median would wear the corners off clean shapes."""
    _, distance = _nearest(image, _ALL_TONED_COLOURS)
    return np.where((distance < 4.0)[..., None], image, _median3(image))


def _nearest(pixels: np.ndarray, palette: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest palette colour for each pixel [..., 3], and its distance."""
    flat = pixels.reshape(-1, 3).astype(np.float64)
    colours = np.asarray(palette, np.float64).reshape(-1, 3)
    squared = (flat ** 2).sum(1)[:, None] - 2.0 * flat @ colours.T + (colours ** 2).sum(1)[None]
    index = squared.argmin(1)
    distance = np.sqrt(np.maximum(squared[np.arange(len(flat)), index], 0.0))
    return index.reshape(pixels.shape[:-1]), distance.reshape(pixels.shape[:-1])


def _distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Colour distance with brightness (the grey axis) counted at half weight: blocks, bands and
    global tones move colours along it, while object colours differ mostly across it."""
    difference = a - b
    brightness = difference.mean(-1, keepdims=True)
    return np.linalg.norm(difference - 0.5 * brightness, axis=-1)


def _erode(mask: np.ndarray) -> np.ndarray:
    """The mask shrunk by a pixel, or the mask itself when nothing would be left."""
    inner = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool))
    return inner if inner.any() else mask


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    if pixels <= 0 or not mask.any():
        return mask
    return ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=pixels)


def _majority(values) -> Optional[str]:
    values = list(values)
    return max(set(values), key=values.count) if values else None


def _text(key: str, **fields) -> str:
    return instructions.fix_articles(FAILURES[key].format(**fields))


def _coverage_score(coverage: float) -> float:
    """0 for (almost) nothing done, 5 from _DONE_COVERAGE on, linear in between."""
    return 5.0 * float(np.clip((coverage - 0.05) / (_DONE_COVERAGE - 0.05), 0.0, 1.0))


def _verdict(perspective: str, score: float, problems: list[str]) -> Verdict:
    score = round(float(np.clip(score, 0.0, 5.0)), 1)
    return Verdict(score, score >= YES_THRESHOLD, "; ".join(problems) or NOTHING_WRONG[perspective])


@dataclasses.dataclass(frozen=True)
class _Palette:
    """Named colours under some tones, for naming what an edited pixel shows."""

    names: tuple[str, ...]
    rgb: np.ndarray  # [K, 3]

    @classmethod
    def of(cls, names, tones) -> "_Palette":
        pairs = [(n, t) for t in tones for n in names]
        rgb = np.array([scenes.tone_colour(scenes.COLOURS[n], t) for n, t in pairs], np.float32)
        return cls(tuple(n for n, _ in pairs), rgb)

    def classify(self, pixels: np.ndarray) -> np.ndarray:
        """Colour name (untoned) of each pixel [..., 3] as an array of strings."""
        return np.array(self.names)[_nearest(pixels, self.rgb)[0]]


@dataclasses.dataclass(frozen=True, eq=False)  # compared by identity
class _ObjectSeen:
    obj: scenes.SceneObject
    status: str  # "kept", "moved", "recoloured" or "missing"
    shift: float = 0.0
    observed: Optional[str] = None  # the colour a recoloured object shows
    pixels: Optional[np.ndarray] = None  # where the object is now (bool [n, n]), if found


# ----------------------------------------------------------------------------------------------
# Following and preserving.

class _EditView:
    """One (instruction, original, edited) triple and the measurements both perspectives share."""

    def __init__(self, instruction: str, original, edited):
        self.original = to_rgb_array(original, "original image")
        self.scene = scenes.recover_scene(self.original)
        self.edit = instructions.parse_instruction(instruction)
        instructions.check_applicable(self.edit, self.scene)
        edited = to_rgb_array(edited, "edited image")
        if edited.shape != self.original.shape:  # model outputs may come at another resolution
            edited = np.asarray(Image.fromarray(edited).resize(self.original.shape[1::-1], Image.BILINEAR))
        self.edited_uint8 = edited
        self.smooth = _denoise(edited.astype(np.float32))
        self.size = self.original.shape[0]
        self.labels = scenes.render_labels(self.scene)
        self.objects_mask = self.labels >= 0
        if self.edit.category == "add":
            self.ideal = None
        else:
            ideal_scene = instructions.apply_edit(self.scene, self.edit)
            self.ideal = scenes.render(ideal_scene).astype(np.float32)

    # --- where the instruction acts --------------------------------------------------------

    @functools.cached_property
    def region(self) -> np.ndarray:
        """Pixels the instruction changes (for an add: the added shape found in the edited image)."""
        if self.edit.category == "add":
            found = self.added
            return found["pixels"] if found else np.zeros(self.labels.shape, bool)
        change = np.linalg.norm(self.ideal - self.original.astype(np.float32), axis=-1)
        return change >= _CHANGED

    @functools.cached_property
    def target(self) -> Optional[scenes.SceneObject]:
        if self.edit.category in ("local", "remove"):
            return self.scene.find(self.edit.colour, self.edit.shape)
        return None

    @functools.cached_property
    def tone_seen(self) -> str:
        """For a global edit: the tone most pixels of the region show."""
        tones = self._pixel_tones(_erode(self.region))
        return _majority(tones.tolist()) or "none"

    def _pixel_tones(self, mask: np.ndarray) -> np.ndarray:
        """Per masked pixel: the tone it shows.

        Read against the tones of the pixel's original colour; a pixel that shows none of them
        (an object moved away, say: a preserving matter) is read against every named colour.
        """
        pixels = self.smooth[mask]
        own = np.stack([scenes.tone_pixels(self.original[mask], t).astype(np.float32) for t in scenes.TONES], 1)
        to_own = np.linalg.norm(pixels[:, None] - own, axis=-1)  # [N, tones]
        to_any = np.stack([_nearest(pixels, palette)[1] for palette in _TONED_PALETTES], 1)
        distances = np.where(to_own.min(1, keepdims=True) < 60.0, to_own, to_any)
        return np.array(scenes.TONES)[distances.argmin(1)]

    @functools.cached_property
    def acceptable_tones(self) -> tuple[str, ...]:
        """Tones untouched things may show: any for a global edit, so partial or wrong tones stay
        a following matter; otherwise none."""
        if self.edit.category != "global":
            return ("none",)
        return tuple(dict.fromkeys(t for t in ("none", self.edit.tone, self.tone_seen) if t in scenes.TONES))

    # --- following -----------------------------------------------------------------------------

    def following(self) -> Verdict:
        if self.edit.category == "add":
            return self._following_add()
        # Read well inside the changed region: a blurry border is a quality matter.
        inner = _erode(self.region)
        deeper = _erode(inner)
        if deeper.sum() >= 4:
            inner = deeper
        if self.edit.category == "global":
            done = self._pixel_tones(inner) == self.edit.tone
        else:
            done = self._nearer_ideal(inner)
        coverage = float(done.mean()) if done.size else 1.0
        score = _coverage_score(coverage)
        problems = [] if coverage >= _DONE_COVERAGE else [self._following_problem(inner)]
        if problems:
            problems += [self._misdirection_text(seen) for seen in self.misdirected]
        return _verdict("following", score, problems)

    def _nearer_ideal(self, mask: np.ndarray) -> np.ndarray:
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

    def _following_problem(self, inner: np.ndarray) -> str:
        edit = self.edit
        seen = _majority(_Palette.of(scenes.COLOURS, ("none",)).classify(self.smooth[inner]).tolist())
        if edit.category == "local":
            if seen == edit.new_colour:
                return _text("part_recoloured", shape=edit.shape, new_colour=edit.new_colour)
            if seen == edit.colour:
                return _text("still_colour", shape=edit.shape, colour=edit.colour)
            return _text("wrong_colour", shape=edit.shape, observed=seen, new_colour=edit.new_colour)
        if edit.category == "remove":
            if seen == edit.colour:
                kept = float(np.mean(self._nearer_ideal(inner)))
                key = "part_removed" if kept >= 0.25 else "still_there"
                return _text(key, colour=edit.colour, shape=edit.shape)
            if seen in scenes.OBJECT_COLOURS:
                return _text("recoloured_not_removed", colour=edit.colour, shape=edit.shape, observed=seen)
            return _text("part_removed", colour=edit.colour, shape=edit.shape)
        if edit.category == "background":
            if seen == edit.new_colour:
                return _text("background_part", new_colour=edit.new_colour)
            if seen in self.scene.background.colours:
                return _text("background_unchanged", observed=seen)
            return _text("background_wrong_colour", observed=seen, new_colour=edit.new_colour)
        # global
        tone = instructions.TONE_WORDS[edit.tone]
        if self.tone_seen == edit.tone:
            return _text("tone_part", tone=tone)
        if self.tone_seen == "none":
            return _text("tone_missing", tone=tone)
        return _text("tone_wrong", observed_tone=instructions.TONE_WORDS[self.tone_seen], tone=tone)

    @functools.cached_property
    def misdirected(self) -> list[_ObjectSeen]:
        """Untouched objects that received the instructed change instead of the target."""
        edit = self.edit
        if edit.category == "local":
            return [s for s in self.objects_seen if s.status == "recoloured" and s.observed == edit.new_colour]
        if edit.category == "remove":
            return [s for s in self.objects_seen if s.status == "missing"]
        return []

    def _misdirection_text(self, seen: _ObjectSeen) -> str:
        key = "misdirected_recolour" if self.edit.category == "local" else "misdirected_remove"
        return _text(key, colour=seen.obj.colour, shape=seen.obj.shape, new_colour=self.edit.new_colour)

    # --- add: the background as seen, and new shapes on it ------------------------------------

    @functools.cached_property
    def background_seen(self) -> list[np.ndarray]:
        """The colour each background part shows in the edited image, away from all objects.

        The median of the part's pixels whose nearest named colour is still that background's (a
        tint keeps it so), so that an added shape covering much of a small part does not count.
        """
        far = ~_dilate(self.objects_mask, 2)
        palette = _Palette.of(scenes.COLOURS, self.acceptable_tones)
        colours = []
        for k, name in enumerate(self.scene.background.colours):
            part = (self.labels == -1 - k) & far
            if not part.any():
                part = self.labels == -1 - k
            pixels = self.smooth[part]
            own = palette.classify(pixels) == name
            colours.append(np.median(pixels[own] if own.sum() >= 4 else pixels, axis=0))
        return colours

    @functools.cached_property
    def new_shapes(self) -> list[dict]:
        """Shapes of an object colour standing on the original background, away from its objects."""
        object_names = list(scenes.OBJECT_COLOURS)
        object_rgb = np.array([scenes.COLOURS[n] for n in object_names], np.float32)
        candidate = np.zeros(self.labels.shape, bool)
        names = np.full(self.labels.shape, "", object)
        for k, background in enumerate(self.background_seen):
            part = (self.labels == -1 - k) & ~_dilate(self.objects_mask, 1)
            palette = np.concatenate([background[None], object_rgb])
            index, _ = _nearest(self.smooth[part], palette)
            far_from_background = np.linalg.norm(self.smooth[part] - background, axis=-1) > 50
            hit = (index > 0) & far_from_background
            ys, xs = np.nonzero(part)
            candidate[ys[hit], xs[hit]] = True
            names[ys[hit], xs[hit]] = np.array(object_names)[index[hit] - 1]
        for seen in self.objects_seen:  # a moved object is not new
            if seen.pixels is not None:
                candidate &= ~_dilate(seen.pixels, 1)
        components, count = ndimage.label(candidate, structure=np.ones((3, 3), bool))
        background_map = np.zeros(self.smooth.shape, np.float32)
        for k, background in enumerate(self.background_seen):
            background_map[self.labels == -1 - k] = background
        raw = self.edited_uint8.astype(np.float32)
        shapes = []
        for k in range(1, count + 1):
            pixels = ndimage.binary_fill_holes(components == k)
            # Too small or too thin for a toy shape: noise, or a blurred edge between two colours.
            if pixels.sum() < 8 or not ndimage.binary_erosion(pixels, structure=np.ones((3, 3), bool)).any():
                continue
            # Named from the component's own pixels: the holes filled above have no colour name.
            colour = _majority(names[components == k].tolist())
            # The median wears corners off a shape that is not pixel-exact: give back the border
            # pixels nearer the shape's colour than the background's that sit in a corner of the
            # shape (two sides touching it; a noisy pixel beside a flat side touches one).
            to_shape = np.linalg.norm(raw - np.float32(scenes.COLOURS[colour]), axis=-1)
            shape_like = (to_shape < np.linalg.norm(raw - background_map, axis=-1)) & (self.labels < 0) \
                & ~_dilate(self.objects_mask, 1)
            cross = ndimage.generate_binary_structure(2, 1)
            for _ in range(2):
                touching = ndimage.convolve(pixels.astype(np.int32), cross.astype(np.int32), mode="constant")
                pixels = pixels | (shape_like & ~pixels & (touching >= 2))
            shape, completeness = _fit_shape(pixels, self.edit.shape or scenes.SHAPES[0])
            shapes.append({"pixels": pixels, "colour": colour, "shape": shape,
                           "completeness": completeness, "area": int(pixels.sum())})
        return shapes

    @functools.cached_property
    def added(self) -> Optional[dict]:
        """The new shape taken as the added object: the requested colour first, then the largest."""
        if not self.new_shapes:
            return None
        return max(self.new_shapes, key=lambda s: (s["colour"] == self.edit.colour, s["area"]))

    def _following_add(self) -> Verdict:
        edit, found = self.edit, self.added
        if found is None:
            return _verdict("following", 0.0, [_text("not_added", colour=edit.colour, shape=edit.shape)])
        colour_ok, shape_ok = found["colour"] == edit.colour, found["shape"] == edit.shape
        completeness = found["completeness"]
        if not colour_ok and not shape_ok:
            return _verdict("following", 0.0, [_text(
                "added_wrong_object", observed=found["colour"], observed_shape=found["shape"],
                colour=edit.colour, shape=edit.shape)])
        if not colour_ok:
            return _verdict("following", 0.5, [_text(
                "added_wrong_colour", shape=edit.shape, observed=found["colour"], colour=edit.colour)])
        if not shape_ok:
            return _verdict("following", 1.0, [_text(
                "added_wrong_object", observed=found["colour"], observed_shape=found["shape"],
                colour=edit.colour, shape=edit.shape)])
        # A found shape loses a few border pixels to noise or blur: 90% of it counts as complete.
        score = _coverage_score(min(1.0, completeness / 0.9))
        problems = [] if completeness >= 0.9 * _DONE_COVERAGE else [_text("added_incomplete", shape=edit.shape)]
        return _verdict("following", score, problems)

    # --- preserving ----------------------------------------------------------------------------

    @functools.cached_property
    def objects_seen(self) -> list[_ObjectSeen]:
        untouched = [o for o in self.scene.objects if o is not self.target]
        return [self._find_object(o) for o in untouched]

    def _find_object(self, obj: scenes.SceneObject) -> _ObjectSeen:
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
        background = [scenes.tone_colour(scenes.COLOURS[c], t)
                      for c in self.scene.background.colours for t in tones]
        background += [tuple(c) for c in np.array(self.background_seen)]
        background += [rgb for rgb in (scenes.tone_colour(c, t) for c in scenes.BACKGROUND_COLOURS.values()
                                       for t in tones)
                       if _distance(own, np.float32(rgb)).min() >= 25.0]
        background = np.array(background, np.float32)
        others = [(c, scenes.tone_colour(scenes.COLOURS[c], t)) for c in scenes.OBJECT_COLOURS if c != obj.colour
                  for t in tones]
        # Another colour indistinguishable from the object's own is evidence for the object.
        others = [(c, rgb) for c, rgb in others if _distance(own, np.float32(rgb)).min() >= 25.0]
        other_rgb = np.array([rgb for _, rgb in others], np.float32).reshape(-1, 3)

        interior = _erode(mask)
        pixels = self.smooth[interior]
        to_own = _distance(pixels[:, None], own[None]).min(1)
        to_background = _distance(pixels[:, None], background[None]).min(1)
        if len(others):
            to_others = _distance(pixels[:, None], other_rgb[None])
            nearest_other = np.array([c for c, _ in others])[to_others.argmin(1)]
            is_other = to_others.min(1) < np.minimum(to_own, to_background)
            if is_other.mean() > 0.5:
                return _ObjectSeen(obj, "recoloured", observed=_majority(nearest_other[is_other].tolist()))

        elsewhere = np.zeros((n, n), bool)
        for other in self.scene.objects:
            if other is not obj:
                elsewhere |= scenes.object_mask(other, n)
        candidates = window & ~_dilate(elsewhere, 1)
        found = np.zeros((n, n), bool)
        pixels = self.smooth[candidates]
        found[candidates] = _distance(pixels[:, None], own[None]).min(1) < \
            _distance(pixels[:, None], background[None]).min(1)
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
            return _ObjectSeen(obj, "moved" if shift >= 1.0 else "kept", shift, pixels=best)
        return _ObjectSeen(obj, "missing")

    def preserving(self) -> Verdict:
        penalties, problems = [], []
        misdirected = self.misdirected
        for seen in self.objects_seen:
            if any(seen is m for m in misdirected):  # a following failure, already named there
                continue
            o = seen.obj
            if seen.status == "moved":
                penalties.append(min(0.8, 0.25 * seen.shift))
                problems.append(_text("object_moved", colour=o.colour, shape=o.shape))
            elif seen.status == "recoloured":
                penalties.append(0.7)
                problems.append(_text("object_recoloured", colour=o.colour, shape=o.shape, observed=seen.observed))
            elif seen.status == "missing":
                penalties.append(0.8)
                problems.append(_text("object_missing", colour=o.colour, shape=o.shape))
        if self.edit.category != "background":
            shift = self._background_shift()
            penalty = float(np.clip((shift - 20.0) / 40.0, 0.0, 0.9))
            if penalty >= 0.1:
                penalties.append(penalty)
                problems.append(_text("background_changed"))
        if self.edit.category in ("local", "remove", "add"):
            for extra in self._extra_shapes():
                penalties.append(0.5)
                problems.append(_text("extra_object", observed=extra["colour"]))
        return _verdict("preserving", 5.0 * (1.0 - min(1.0, sum(penalties))), problems)

    def _untouched_background(self) -> np.ndarray:
        keep = (self.labels < 0) & ~_dilate(self.objects_mask, 2) & ~_dilate(self.region, 2)
        for seen in self.objects_seen:
            if seen.pixels is not None:
                keep &= ~_dilate(seen.pixels, 1)
        return keep

    def _background_shift(self) -> float:
        """RGB length of the untouched background's mean colour error.

        The error is averaged per row and per column first and the smaller of the two results is
        kept: zero-mean stripes (banding) cancel along their own axis even where objects hide part
        of the background, while a real shift shows in both.
        """
        keep = self._untouched_background()
        errors = np.full(self.smooth.shape, np.nan, np.float32)
        for k, name in enumerate(self.scene.background.colours):
            part = keep & (self.labels == -1 - k)
            if not part.any():
                continue
            accepted = np.array([scenes.tone_colour(scenes.COLOURS[name], t) for t in self.acceptable_tones],
                                np.float32)
            pixels = self.smooth[part]
            errors[part] = pixels - accepted[_nearest(pixels, accepted)[0]]
        if not keep.any():
            return 0.0
        shifts = []
        for axis in (0, 1):
            counts = np.sum(~np.isnan(errors[..., 0]), axis=axis)
            sums = np.nansum(errors, axis=axis)
            line_means = (sums / np.maximum(counts, 1)[:, None])[counts >= 2]
            if len(line_means):
                shifts.append(float(np.linalg.norm(line_means.mean(0))))
        return min(shifts) if shifts else 0.0

    def _extra_shapes(self) -> list[dict]:
        near_edit = _dilate(self.region, 1)
        return [s for s in self.new_shapes
                if s is not self.added and not (s["pixels"] & near_edit).any()]


def _fit_shape(pixels: np.ndarray, wanted: str) -> tuple[str, float]:
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
    blob = pixels[top:top + height, left:left + width]
    area = float(blob.sum())
    fits = {}  # shape -> (IoU, part of the blob inside, part of the shape filled)
    for shape in scenes.SHAPES:
        template = scenes.shape_mask(shape, side)
        best = (-1.0, 0.0, 0.0)
        for dy in range(side - height + 1):
            for dx in range(side - width + 1):
                placed = template[dy:dy + height, dx:dx + width]
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


# ----------------------------------------------------------------------------------------------
# Quality, from the edited image alone.

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
    smooth = _median3(image)
    n = image.shape[0]

    palette = _image_palette(image, smooth)
    exact_index, exact_distance = _nearest(image, palette)
    smooth_index, _ = _nearest(smooth, palette)
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
        return ndimage.minimum_filter(labels, size=size, mode="nearest") == \
            ndimage.maximum_filter(labels, size=size, mode="nearest")

    flat = uniform(5 if n >= 24 else 3)
    edge_band = ~uniform(5)  # blur spreads an edge over 2 px on each side

    noise = 1.4826 * float(np.median(np.abs(image - smooth)))

    blur = 0.0
    if edge_band.any():
        contrast = np.maximum(_neighbourhood_contrast(labels, palette, 5)[edge_band], 30.0)
        at_edges = np.linalg.norm(image - reference, axis=-1)[edge_band] / contrast
        floor = np.linalg.norm(image - reference, axis=-1)[flat].mean() / float(contrast.mean()) \
            if flat.any() else 0.0
        blur = max(0.0, float(at_edges.mean()) - float(floor) - 0.03)

    banding, blockiness = _stripes_and_blocks((smooth - reference).mean(-1), flat, flaws.block_size(n))
    # Median-filtered noise leaves a little block and stripe structure of its own.
    banding, blockiness = (float(np.sqrt(max(0.0, v ** 2 - (0.12 * noise) ** 2))) for v in (banding, blockiness))
    raw = {"noise": noise, "blur": blur, "blockiness": blockiness, "banding": banding}
    return {k: raw[k] / _QUALITY_SCALES[k] for k in raw}


def _image_palette(image: np.ndarray, smooth: np.ndarray) -> np.ndarray:
    """The untoned named colours, plus each tone the image shows exactly.

    A tone counts when its "telling" colours (those at least 20 away from every untoned colour) are
    exactly (within rounding) the colour of >= 20% of the pixels, split over at least two of them,
    or of >= 30% in one (a background). Toned renderings are integer-exact, while a brightness
    offset (a band, a block) on a grey background would otherwise pass for the greyscale tone.
    """
    palette = [_UNTONED]
    for tone in scenes.TONES[1:]:
        toned = scenes.tone_pixels(_UNTONED.astype(np.uint8), tone).astype(np.float32)
        _, separation = _nearest(toned, _UNTONED)
        telling = toned[separation >= 20.0]
        if len(telling) < 2:
            continue
        raw_index, raw_distance = _nearest(image, telling)
        smooth_index, smooth_distance = _nearest(smooth, telling)
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
            neighbour = padded[dy:dy + n, dx:dx + n]
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
    profile_image = (np.nan_to_num(rows)[:, None] if row_spread >= col_spread else np.nan_to_num(cols)[None, :])
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
    problems = [_text(k) for k, v in ordered if v >= 0.15 and v >= 0.5 * worst]
    return _verdict("quality", 5.0 * (1.0 - min(1.0, total)), problems)
