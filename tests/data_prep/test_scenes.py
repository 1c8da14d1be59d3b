import itertools

import numpy as np
import pytest

from data_prep.toy import scenes


def test_palettes_are_disjoint_and_far_apart():
  assert not set(scenes.OBJECT_COLOURS) & set(scenes.BACKGROUND_COLOURS)
  closest = min(
      np.linalg.norm(np.subtract(a, b))
      for a, b in itertools.combinations(scenes.COLOURS.values(), 2)
  )
  assert closest > 90


@pytest.mark.parametrize("size", [16, 24, 32, 48])
def test_render_is_exact_and_recoverable(size):
  for seed in range(40):
    scene = scenes.random_scene(np.random.default_rng(seed), size=size)
    image = scenes.render(scene)
    assert image.dtype == np.uint8 and image.shape == (size, size, 3)
    palette = {tuple(c) for c in scenes.COLOURS.values()}
    assert {tuple(p) for p in image.reshape(-1, 3)} <= palette  # no anti-aliasing
    assert 1 <= len(scene.objects) <= 3
    assert len({(o.colour, o.shape) for o in scene.objects}) == len(scene.objects)
    recovered = scenes.recover_scene(image)
    assert np.array_equal(scenes.render(recovered), image)
    assert {(o.colour, o.shape, o.top, o.left, o.size) for o in recovered.objects} == {
        (o.colour, o.shape, o.top, o.left, o.size) for o in scene.objects
    }
    assert recovered.background == scene.background


def test_scenes_are_deterministic_per_seed():
  a = scenes.random_scene(np.random.default_rng(5))
  b = scenes.random_scene(np.random.default_rng(5))
  c = scenes.random_scene(np.random.default_rng(6))
  assert a == b and a != c


def test_shapes_fill_their_box_and_differ():
  for size in range(5, 14):
    masks = {s: scenes.shape_mask(s, size) for s in scenes.SHAPES}
    for mask in masks.values():  # every shape touches all four sides of its box
      assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
    assert len({m.tobytes() for m in masks.values()}) == 3


def test_tones_are_exact_and_visible():
  red = scenes.COLOURS["red"]
  assert scenes.tone_colour(red, "none") == red
  assert scenes.tone_colour(red, "darker") == (105, 15, 20)
  assert scenes.tone_colour(red, "lighter") == (233, 143, 148)
  grey = scenes.tone_colour(red, "greyscale")
  assert grey[0] == grey[1] == grey[2]


def test_recover_scene_rejects_what_is_not_a_clean_scene():
  image = scenes.render(scenes.random_scene(np.random.default_rng(0)))
  noisy = image.copy()
  noisy[3, 3] = (1, 2, 3)
  with pytest.raises(ValueError, match="not palette colours"):
    scenes.recover_scene(noisy)
  with pytest.raises(ValueError, match="square uint8"):
    scenes.recover_scene(image.astype(np.float32))
  blob = np.full((16, 16, 3), scenes.COLOURS["white"], np.uint8)
  blob[2:6, 2:9] = scenes.COLOURS["red"]  # a rectangle is no toy shape
  with pytest.raises(ValueError, match="not a toy shape"):
    scenes.recover_scene(blob)
