import json
import zlib

import numpy as np
import pytest

from data_prep import toy_edit
from mre.data import pipeline
from mre.data.pipeline import EditPipeline, FeatureKeys, PipelineConfig
from mre.models.reward_config import RewardConfig


def word_tokenizer(texts):
  """A deterministic stand-in tokenizer: [start, word ids..., end, pad...] of length 77."""
  ids = np.zeros((len(texts), 77), np.int32)
  for i, text in enumerate(texts):
    words = [3 + zlib.crc32(w.encode()) % 997 for w in text.split()][:75]
    ids[i, : len(words) + 2] = [1, *words, 2]
  return ids


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  toy_edit.ensure_built(data_dir, "tiny")
  return data_dir


@pytest.fixture(scope="module")
def toy_source(toy_dir):
  return toy_edit.data_source(toy_dir, "tiny", "train")


def _pairs(count=12, height=20, width=28, seed=0):
  """Records whose edited image equals the original: any crop/flip mismatch shows."""
  rng = np.random.default_rng(seed)
  records = []
  for i in range(count):
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    records.append(
        {"input_image": image, "edited_image": image.copy(), "edit_prompt": f"edit number {i}"}
    )
  return records


OTHER_KEYS = FeatureKeys(
    original="input_image",
    edited="edited_image",
    instruction="edit_prompt",
    reward_scores=None,
    reward_texts=None,
)


def _take(config, source, count, tokenizer=word_tokenizer, **kwargs):
  with iter(EditPipeline(source, tokenizer, config, **kwargs)) as batches:
    return [next(batches) for _ in range(count)]


def test_batches_hold_model_inputs(toy_source):
  batch = _take(PipelineConfig(batch_size=4, resolution=16), toy_source, 1)[0]
  assert batch["original"].dtype == np.float32 and batch["original"].shape == (4, 16, 16, 3)
  assert batch["edited"].shape == (4, 16, 16, 3)
  assert -1.0 <= batch["original"].min() and batch["original"].max() <= 1.0
  assert batch["instruction_ids"].dtype == np.int32 and batch["instruction_ids"].shape == (4, 77)
  assert batch["reward_scores"].shape == (4, 3) and batch["reward_text_ids"].shape == (4, 3, 77)
  record = toy_source[int(batch["record_key"][0])]
  assert np.allclose(batch["reward_scores"][0], record["reward_scores"])
  assert np.array_equal(
      batch["instruction_ids"][0], word_tokenizer([record["instruction"].decode()])[0]
  )
  flipped = np.allclose(batch["original"][0], record["original"][:, ::-1] / 127.5 - 1)
  assert flipped or np.allclose(batch["original"][0], record["original"] / 127.5 - 1)
  released = RewardConfig(form="released")
  joined = _take(PipelineConfig(batch_size=4, resolution=16, reward=released), toy_source, 1)[0]
  assert joined["reward_text_ids"].shape == (4, 1, 77)  # the released form's one text slot
  texts = [t.decode() for t in toy_source[int(joined["record_key"][0])]["reward_texts"]]
  assert np.array_equal(joined["reward_text_ids"][0], word_tokenizer(["; ".join(texts)]))


def test_restored_state_gives_exactly_the_next_batch(toy_source):
  config = PipelineConfig(batch_size=5, resolution=16, seed=4)
  pipe = EditPipeline(toy_source, word_tokenizer, config)
  assert pipe.batches_per_epoch == 9
  with iter(pipe) as batches:
    for _ in range(8):  # the next batch crosses into epoch 2
      next(batches)
    state = json.loads(json.dumps(batches.get_state()))  # as saved in a checkpoint
    expected = [next(batches) for _ in range(3)]
  with iter(pipe) as resumed:
    resumed.set_state(state)
    for want in expected:
      got = next(resumed)
      assert all(np.array_equal(got[k], want[k]) for k in want)
  other = EditPipeline(
      toy_source, word_tokenizer, PipelineConfig(batch_size=5, resolution=16, seed=5)
  )
  with iter(other) as batches, pytest.raises(ValueError, match="belongs to another pipeline"):
    batches.set_state(state)


def test_crop_and_flip_are_shared_by_both_images():
  config = PipelineConfig(batch_size=4, resolution=16, max_upscale=1.5, seed=1, keys=OTHER_KEYS)
  batches = _take(config, _pairs(), 12)  # 4 epochs of 12 records
  crops = {}
  for batch in batches:
    assert np.array_equal(batch["original"], batch["edited"])
    for key, image in zip(batch["record_key"], batch["original"]):
      crops.setdefault(int(key), set()).add(image.tobytes())
  # Each record's crop/flip changes from epoch to epoch (4 epochs, fresh draws each time).
  assert np.mean([len(v) > 1 for v in crops.values()]) > 0.9


def test_crop_and_flip_cut_the_same_window():
  image = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
  edited = 255 - image
  config = PipelineConfig(batch_size=1, resolution=16)
  windows = [image[:, left : left + 16] for left in range(9)]
  flips, lefts = 0, set()
  for seed in range(30):
    a, b = pipeline._crop_and_flip(np.random.default_rng(seed), image, edited, config)
    assert np.array_equal(b, 255 - a)  # the same window, the same flip
    matches = [(left, False) for left, w in enumerate(windows) if np.array_equal(a, w)]
    matches += [(left, True) for left, w in enumerate(windows) if np.array_equal(a, w[:, ::-1])]
    assert len(matches) == 1
    lefts.add(matches[0][0])
    flips += matches[0][1]
  assert 5 <= flips <= 25 and len(lefts) >= 5


def test_order_is_seeded_and_epochs_reshuffle(toy_source):
  config = PipelineConfig(batch_size=8, resolution=16, seed=2)
  keys = [b["record_key"] for b in _take(config, toy_source, 12)]
  again = [b["record_key"] for b in _take(config, toy_source, 12)]
  assert all(np.array_equal(a, b) for a, b in zip(keys, again))
  first, second = np.concatenate(keys[:6]), np.concatenate(keys[6:])
  assert sorted(first) == sorted(second) == list(range(48))  # every record once per epoch
  assert not np.array_equal(first, second)
  other = np.concatenate(
      [b["record_key"] for b in _take(PipelineConfig(8, 16, seed=3), toy_source, 6)]
  )
  assert not np.array_equal(first, other)


def test_processes_read_disjoint_equal_shards(toy_source):
  config = PipelineConfig(batch_size=4, resolution=16, num_epochs=1)
  seen = []
  for index in range(3):
    pipe = EditPipeline(toy_source, word_tokenizer, config, process_index=index, process_count=3)
    assert pipe.records_per_process == 16 and pipe.batches_per_epoch == 4
    with iter(pipe) as batches:
      keys = np.concatenate([b["record_key"] for b in batches])
    assert len(keys) == 16
    seen.append(set(keys.tolist()))
  assert set.union(*seen) == set(range(48)) and sum(map(len, seen)) == 48
  with pytest.raises(ValueError, match="process_index 3"):
    EditPipeline(toy_source, word_tokenizer, config, process_index=3, process_count=3)


def test_worker_processes_give_the_same_batches(toy_source):
  config = PipelineConfig(batch_size=4, resolution=12, max_upscale=1.3, seed=6)
  single = _take(config, toy_source, 4)
  with_workers = PipelineConfig(
      batch_size=4, resolution=12, max_upscale=1.3, seed=6, worker_count=2
  )
  workers = _take(with_workers, toy_source, 4)
  for a, b in zip(single, workers):
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_other_datasets_and_bad_inputs():
  batch = _take(PipelineConfig(batch_size=3, resolution=16, keys=OTHER_KEYS), _pairs(), 1)[0]
  assert set(batch) == {"original", "edited", "instruction_ids", "record_key"}
  with pytest.raises(KeyError, match="no 'original' field"):
    _take(PipelineConfig(batch_size=3, resolution=16), _pairs(), 1)
  with pytest.raises(ValueError, match="tokenizer must return an int array"):
    _take(PipelineConfig(2, 16, keys=OTHER_KEYS), _pairs(), 1, tokenizer=lambda texts: np.zeros(77))
  with pytest.raises(ValueError, match="cannot fill a batch of 64"):
    EditPipeline(_pairs(), word_tokenizer, PipelineConfig(64, 16, keys=OTHER_KEYS))
  with pytest.raises(ValueError, match="max_upscale must be >= 1"):
    PipelineConfig(4, 16, max_upscale=0.5)
