import collections
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_prep import toy_edit
from data_prep.toy import flaws, instructions, judge
from data_prep.toy_edit import toy_edit_dataset_builder as builder_module


# Run in a fresh interpreter whose import system cannot see TensorFlow (find_spec answers None,
# as on a machine without it), so the check holds whether or not TensorFlow is installed here.
_WITHOUT_TENSORFLOW = """
import importlib.machinery, sys

class HideTensorFlow(importlib.machinery.PathFinder):
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    if name == "tensorflow" or name.startswith("tensorflow."):
      return None
    return super().find_spec(name, path, target)

sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = HideTensorFlow
from data_prep import toy_edit
toy_edit.ensure_built(sys.argv[1], "tiny")
record = toy_edit.data_source(sys.argv[1], "tiny", "test")[0]
assert record["original"].shape == (16, 16, 3), record["original"].shape
assert "tensorflow" not in sys.modules
"""


def test_builds_and_reads_without_tensorflow(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
  done = subprocess.run(
      [sys.executable, "-c", _WITHOUT_TENSORFLOW, str(tmp_path)],
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tfds"))
  toy_edit.ensure_built(directory, "tiny")
  return directory


def test_tiny_builds_with_the_right_counts_and_features(data_dir):
  builder = tfds.builder(toy_edit.dataset_name("tiny"), data_dir=data_dir)
  assert builder.info.splits["train"].num_examples == 48
  assert builder.info.splits["test"].num_examples == 20
  assert str(builder.info.file_format.value) == "array_record"
  train = toy_edit.data_source(data_dir, "tiny", "train")
  assert len(train) == 48
  ids = set()
  for record in train:
    ids.add(record["id"])
    for image in ("original", "edited", "ideal"):
      assert record[image].dtype == np.uint8 and record[image].shape == (16, 16, 3)
    assert record["reward_scores"].dtype == np.float32 and record["reward_scores"].shape == (3,)
    assert ((0 <= record["reward_scores"]) & (record["reward_scores"] <= 5)).all()
    assert len(record["reward_texts"]) == 3 and all(t for t in record["reward_texts"])
    edit = instructions.parse_instruction(record["instruction"].decode())
    assert edit.category == record["category"].decode()
    modes = {p: record["flaws"][p]["mode"].decode() for p in flaws.PERSPECTIVES}
    for p, mode in modes.items():
      assert mode == "none" or mode in flaws.MODES[p]
    # The stored annotation is the judge's verdict on the stored triple.
    verdict = judge.judge(record["instruction"].decode(), record["original"], record["edited"])
    assert np.allclose(verdict.scores, record["reward_scores"])
    assert list(verdict.failures) == [t.decode() for t in record["reward_texts"]]
    if all(m == "none" for m in modes.values()):
      assert np.array_equal(record["edited"], record["ideal"])
  assert len(ids) == 48


def test_test_split_has_every_category_per_scene_and_perfect_targets(data_dir):
  test = toy_edit.data_source(data_dir, "tiny", "test")
  per_scene = collections.defaultdict(set)
  for record in test:
    scene = record["id"].decode().rsplit("_", 1)[0]
    per_scene[scene].add(record["category"].decode())
    assert np.array_equal(record["edited"], record["ideal"])
    assert record["reward_scores"].tolist() == [5.0, 5.0, 5.0]
    assert [t.decode() for t in record["reward_texts"]] == list(judge.NOTHING_WRONG.values())
  assert len(per_scene) == 4 and all(c == set(instructions.CATEGORIES) for c in per_scene.values())


def test_generation_is_deterministic_and_built_once(data_dir, monkeypatch):
  config = next(c for c in toy_edit.CONFIGS if c.name == "tiny")
  a, b = builder_module.train_example(config, 7), builder_module.train_example(config, 7)
  assert a["edited"] == b["edited"] and a["instruction"] == b["instruction"]
  record = next(
      r for r in toy_edit.data_source(data_dir, "tiny", "train") if r["id"] == b"train_000007"
  )
  assert record["instruction"].decode() == a["instruction"]
  # Already there: no rebuild. Generating would call the builder's split generators, and
  # writing would touch the prepared files; neither may happen.
  before = _files(data_dir)
  calls = []
  monkeypatch.setattr(
      builder_module.Builder, "_split_generators", lambda self, dl_manager: calls.append(1) or {}
  )
  toy_edit.ensure_built(data_dir, "tiny")
  assert not calls
  assert _files(data_dir) == before


def _files(directory):
  """{path: (size, mtime_ns, inode)} of every file under `directory` (lock files aside)."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      if not name.endswith(".lock"):
        stat = os.stat(os.path.join(root, name))
        out[os.path.join(root, name)] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
  return out


def test_configs_and_bad_names():
  names = [c.name for c in toy_edit.CONFIGS]
  assert names[0] == toy_edit.DEFAULT_CONFIG == "32px" and "tiny" in names
  assert toy_edit.dataset_name("24px") == "toy_edit/24px"
  with pytest.raises(ValueError, match="unknown toy_edit config 'huge'"):
    toy_edit.ensure_built("/tmp/unused", "huge")
