import numpy as np
import pytest

from data_prep.toy import flaws, instructions, scenes


def _samples(count, seed=0, size=32):
  for i in range(count):
    rng = np.random.default_rng([seed, i])
    scene = scenes.random_scene(rng, size=size)
    yield rng, scene, instructions.sample_edit(rng, scene)


def test_most_samples_carry_a_recorded_flaw():
  flawed, modes = 0, {p: set() for p in flaws.PERSPECTIVES}
  total = 300
  for rng, scene, sample in _samples(total):
    target = flaws.make_flawed_target(rng, scene, sample, flaws.FlawMix())
    assert target.image.dtype == np.uint8 and target.image.shape == (32, 32, 3)
    assert set(target.flaws) == set(flaws.PERSPECTIVES)
    recorded = [f for f in target.flaws.values() if f is not None]
    for f in recorded:
      assert f.mode in flaws.MODES[f.perspective] and 0.0 < f.severity <= 1.0
      modes[f.perspective].add(f.mode)
    perfect = np.array_equal(target.image, scenes.render(sample.edited_scene))
    assert perfect == (not recorded)  # a flaw always shows, and nothing else changes the edit
    flawed += bool(recorded)
  assert 0.65 < flawed / total < 0.9  # 1 - 0.6^3 = 0.78 with the default mix
  assert all(modes[p] == set(flaws.MODES[p]) for p in flaws.PERSPECTIVES), modes


def test_mix_is_configurable():
  only_noise = flaws.FlawMix(
      following_prob=0.0,
      preserving_prob=0.0,
      quality_prob=1.0,
      quality_weights={"noise": 1.0},
      min_severity=0.5,
      max_severity=0.5,
  )
  for rng, scene, sample in _samples(20):
    target = flaws.make_flawed_target(rng, scene, sample, only_noise)
    assert target.flaws == {
        "following": None,
        "preserving": None,
        "quality": flaws.Flaw("quality", "noise", 0.5),
    }
    target = flaws.make_flawed_target(rng, scene, sample, flaws.NO_FLAWS)
    assert np.array_equal(target.image, scenes.render(sample.edited_scene))
  with pytest.raises(ValueError, match="unknown quality flaw modes"):
    flaws.FlawMix(quality_weights={"jpeg": 1.0})
  with pytest.raises(ValueError, match="following_prob"):
    flaws.FlawMix(following_prob=1.5)


def test_flaws_are_deterministic_per_seed():
  ((_, scene, sample),) = _samples(1, seed=3)
  a = flaws.make_flawed_target(
      np.random.default_rng(1), scene, sample, flaws.FlawMix(0.9, 0.9, 0.9)
  )
  b = flaws.make_flawed_target(
      np.random.default_rng(1), scene, sample, flaws.FlawMix(0.9, 0.9, 0.9)
  )
  assert a.flaws == b.flaws and np.array_equal(a.image, b.image)


def test_severity_scales_a_flaw():
  ((_, scene, sample),) = _samples(1, seed=4)
  ideal = scenes.render(sample.edited_scene).astype(np.float32)
  for mode in flaws.MODES["quality"]:
    errors = []
    for severity in (0.2, 1.0):
      image = flaws._degrade(np.random.default_rng(0), ideal, flaws.Flaw("quality", mode, severity))
      errors.append(np.abs(image - ideal).mean())
    assert 0 < errors[0] < errors[1], mode


def test_background_shift_keeps_the_background_name():
  for rng, scene, sample in _samples(60, seed=5):
    if sample.edit.category in ("background", "global"):
      continue
    target = flaws.make_flawed_target(
        rng, scene, sample, flaws.NO_FLAWS, forced={"preserving": "background_shift"}
    )
    labels = scenes.render_labels(sample.edited_scene)
    palette = np.array(list(scenes.COLOURS.values()), np.float32)
    names = np.array(list(scenes.COLOURS))
    for k, name in enumerate(sample.edited_scene.background.colours):
      pixels = target.image[labels == -1 - k].astype(np.float32)
      nearest = names[np.linalg.norm(pixels[:, None] - palette[None], axis=-1).argmin(1)]
      assert (nearest == name).all()
      assert np.linalg.norm(pixels.mean(0) - scenes.COLOURS[name]) > 10


def test_also_edited_lands_the_instructed_change_on_another_object_too():
  from data_prep.toy import judge

  seen = 0
  for rng, scene, sample in _samples(80, seed=6):
    target = flaws.make_flawed_target(
        rng, scene, sample, flaws.NO_FLAWS, forced={"preserving": "also_edited"}
    )
    edit = sample.edit
    if edit.category not in ("local", "remove") or target.flaws["preserving"] is None:
      assert np.array_equal(target.image, scenes.render(sample.edited_scene))
      continue
    seen += 1
    ideal = scenes.render(sample.edited_scene)
    assert not np.array_equal(target.image, ideal)
    verdict = judge.judge(sample.instruction, scenes.render(scene), target.image)
    assert verdict.following.score == 5.0 and not verdict.preserving.yes, verdict
    word = "turned " + edit.new_colour if edit.category == "local" else "disappeared"
    assert verdict.preserving.failure.endswith(word), verdict
  assert seen >= 10
  # With a following flaw the target is not edited right: the mode does not apply.
  for rng, scene, sample in _samples(40, seed=7):
    target = flaws.make_flawed_target(
        rng,
        scene,
        sample,
        flaws.NO_FLAWS,
        forced={"following": "no_change", "preserving": "also_edited"},
    )
    assert target.flaws["preserving"] is None
