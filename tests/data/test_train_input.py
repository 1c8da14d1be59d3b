"""The trainer's input (mre/data/train_input.py): which field it trains towards."""

import types

import numpy as np
import pytest

from configs import ip2p
from mre.data import train_input


class _LengthTokenizer:
  """Stand-in tokenizer: each text becomes [len(text)] padded to 8 ids."""

  model_max_length = 8

  def __call__(self, texts, **kwargs):
    ids = np.zeros((len(texts), 8), np.int32)
    ids[:, 0] = [len(t) for t in texts]
    return types.SimpleNamespace(input_ids=ids)


def _config(data_dir, target):
  c = ip2p.get_config("toy")
  c.data.config, c.data.resolution, c.data.data_dir = "tiny", 16, data_dir
  c.data.random_flip, c.data.target_key = False, target
  return c


@pytest.mark.parametrize("target", ["edited", "ideal"])
def test_batches_hold_the_configured_target_field(toy_data, target):
  cfg = _config(toy_data, target)
  source = train_input.open_dataset(cfg)
  data = train_input.TrainIterator(
      source, cfg, _LengthTokenizer(), batch_size=16, accum=1, reward=None
  )
  batch = next(iter(data.pipeline))
  data.close()
  unit = lambda image: np.asarray(image, np.float32) / 127.5 - 1.0  # noqa: E731
  differ = 0
  for key, edited in zip(batch["record_key"], batch["edited"]):
    record = source.train[int(key)]
    np.testing.assert_allclose(edited, unit(record[target]), atol=1e-6)
    differ += not np.array_equal(record["edited"], record["ideal"])
  assert differ > 0  # flawed and ideal edits differ in this batch: the check can fail


def test_a_target_field_the_records_lack_is_named(toy_data):
  cfg = _config(toy_data, "perfect")
  source = train_input.open_dataset(cfg)
  data = train_input.TrainIterator(
      source, cfg, _LengthTokenizer(), batch_size=4, accum=1, reward=None
  )
  with pytest.raises(Exception, match="'perfect'"):
    data.next()
  data.close()
