import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_prep import instruct_pix2pix, manual_dir
from mre.data.pipeline import EditPipeline, FeatureKeys, PipelineConfig
from tests.data_prep.manual_fixtures import make_ip2p, write_json


@pytest.fixture(scope="module")
def manual(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("manual") / "ip2p")
  seeds = make_ip2p(root)
  seeds += [
      ["../outside", [1, 2]],
      ["/abs", [1]],
      ["k1", [5]],
      ["k8", "not a list"],
      ["k9", []],
      ["k2", [11, "x"]],
      42,
  ]
  seeds[1] = ["k2", [11, 3, 11]]  # a repeated seed is one pair
  write_json(os.path.join(root, "seeds.json"), seeds)
  return root


@pytest.fixture(scope="module")
def data_dir(manual, tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tfds"))
  for config in ("all_seeds", "one_seed"):
    instruct_pix2pix.build(manual, directory, config)
  return directory


# Pairs: k1:5, k2:11, k2:3, k5:9, k6:2 are good; k3:7 corrupt, k4:8 missing original, k7:4 bad prompt.
# Skips count examples: an unusable entry counts once per seed it lists (all_seeds), or once (one_seed).
BAD = {
    "corrupt_image": 1,
    "missing_image": 1,
    "bad_prompt": 1,
    "unsafe_key": 3,
    "duplicate_key": 1,
    "bad_entry": 5,
}


def test_all_seeds_counts_report_and_images(manual, data_dir):
  builder = tfds.builder("instruct_pix2pix/all_seeds", data_dir=data_dir)
  report = manual_dir.read_report(builder)
  assert builder.info.splits["train"].num_examples == 5 and report["kept"] == {"train": 5}
  assert report["skipped"]["train"] == BAD
  source = tfds.data_source("instruct_pix2pix/all_seeds", split="train", data_dir=data_dir)
  records = {r["id"].decode(): r for r in source}
  assert set(records) == {"k1:5", "k2:11", "k2:3", "k5:9", "k6:2"}
  for record in records.values():
    key, seed = record["key"].decode(), int(record["seed"])
    expected = np.asarray(Image.open(os.path.join(manual, key, f"{seed}_1.jpg")).convert("RGB"))
    assert np.array_equal(record["edited"], expected)
  assert records["k5:9"]["instruction"] == b"make it snow"


def test_one_seed_takes_the_first_listed(data_dir):
  builder = tfds.builder("instruct_pix2pix/one_seed", data_dir=data_dir)
  report = manual_dir.read_report(builder)
  assert report["kept"] == {"train": 4}
  assert report["skipped"]["train"] == {**BAD, "unsafe_key": 2, "bad_entry": 4}
  source = tfds.data_source("instruct_pix2pix/one_seed", split="train", data_dir=data_dir)
  assert {(r["id"], int(r["seed"])) for r in source} == {
      (b"k1", 5),
      (b"k2", 11),
      (b"k5", 9),
      (b"k6", 2),
  }


def test_grain_pipeline_reads_it(data_dir):
  source = tfds.data_source("instruct_pix2pix/all_seeds", split="train", data_dir=data_dir)
  keys = FeatureKeys(reward_scores=None, reward_texts=None)
  config = PipelineConfig(batch_size=5, resolution=16, shuffle=False, num_epochs=1, keys=keys)
  tokenizer = lambda texts: np.ones((len(texts), 4), np.int32)
  batch = next(iter(EditPipeline(source, tokenizer, config)))
  assert batch["original"].shape == (5, 16, 16, 3) and "reward_scores" not in batch
  assert -1.0 <= batch["edited"].min() < batch["edited"].max() <= 1.0


def test_seeds_json_is_required(tmp_path):
  root = str(tmp_path / "ip2p")
  make_ip2p(root)
  with pytest.raises(FileNotFoundError, match="seeds.json is missing"):
    instruct_pix2pix.build(root, str(tmp_path / "tfds"))
