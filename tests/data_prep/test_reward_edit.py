import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_prep import manual_dir, reward_edit
from mre.data.pipeline import EditPipeline, FeatureKeys, PipelineConfig
from tests.data_prep.manual_fixtures import GOOD_REWARD, make_ip2p, write_json


def tokenizer(texts):
  return np.array([[len(t), *([0] * 7)] for t in texts], np.int32)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("manual") / "ip2p")
  seeds = make_ip2p(root)
  write_json(os.path.join(root, "seeds.json"), seeds)
  bad_score = [GOOD_REWARD[0], {"Score": 6.5, "Negative Prompt": "x"}, GOOD_REWARD[2]]
  rewards = {
      "k1": GOOD_REWARD,
      "k2": GOOD_REWARD,
      "k2:3": GOOD_REWARD,
      "k3": GOOD_REWARD,
      "k4": GOOD_REWARD,
      "k5": GOOD_REWARD,
      "k6": GOOD_REWARD,
      "k7": GOOD_REWARD,
      "bad_score": bad_score,
      "bool_score": [{"Score": True, "Negative Prompt": "x"}] + GOOD_REWARD[1:],
      "two_only": GOOD_REWARD[:2],
      "../outside": GOOD_REWARD,
      "/etc/passwd": GOOD_REWARD,
      "k99": GOOD_REWARD,
  }
  write_json(os.path.join(root, "RewardEdit_20K.json"), rewards)
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  return root, data_dir, reward_edit.build(root, data_dir)


def test_counts_and_report(built):
  root, data_dir, builder = built
  assert builder.info.splits["train"].num_examples == 5
  report = manual_dir.read_report(builder)
  assert report["kept"] == {"train": 5} and report["skipped_total"] == 9
  assert report["skipped"]["train"] == {
      "corrupt_image": 1,
      "missing_image": 1,
      "bad_prompt": 1,
      "bad_score": 2,
      "missing_perspective": 1,
      "unsafe_key": 2,
      "missing_folder": 1,
  }
  assert report["notes"] == {"several_seeds_took_first_listed": 1}
  assert {e["key"] for e in report["skipped_examples"]["unsafe_key"]} == {
      "../outside",
      "/etc/passwd",
  }
  assert "outside 0..5" in report["skipped_examples"]["bad_score"][0]["detail"]
  assert os.path.dirname(builder.data_dir) == os.path.join(data_dir, "reward_edit")


def test_records_hold_the_right_pairs_and_rewards(built):
  root, data_dir, _ = built
  source = tfds.data_source("reward_edit", split="train", data_dir=data_dir)
  records = {r["id"].decode(): r for r in source}
  assert set(records) == {"k1", "k2", "k2:3", "k5", "k6"}
  assert (records["k2"]["seed"], records["k2:3"]["seed"], records["k1"]["seed"]) == (11, 3, 5)
  for reward_id, record in records.items():
    key, seed = record["key"].decode(), int(record["seed"])
    for side, name in ((0, "original"), (1, "edited")):
      expected = np.asarray(
          Image.open(os.path.join(root, key, f"{seed}_{side}.jpg")).convert("RGB")
      )
      assert np.array_equal(record[name], expected) and record[name].dtype == np.uint8
    assert record["reward_scores"].tolist() == [4.0, 3.5, 5.0]
    assert [t.decode() for t in record["reward_texts"]] == [
        r["Negative Prompt"] for r in GOOD_REWARD
    ]
  assert records["k6"]["original"].shape == (40, 30, 3)  # a grayscale JPEG, read as RGB
  assert (
      records["k5"]["instruction"] == b"make it snow"
      and records["k1"]["instruction"] == b"turn the cup blue"
  )


def test_grain_pipeline_reads_it(built):
  _, data_dir, _ = built
  source = tfds.data_source("reward_edit", split="train", data_dir=data_dir)
  config = PipelineConfig(
      batch_size=5, resolution=16, shuffle=False, num_epochs=1, keys=FeatureKeys()
  )
  batch = next(iter(EditPipeline(source, tokenizer, config)))
  assert batch["original"].shape == batch["edited"].shape == (5, 16, 16, 3)
  assert batch["reward_scores"].tolist() == [[4.0, 3.5, 5.0]] * 5
  assert batch["reward_text_ids"].shape == (5, 3, 8) and batch["instruction_ids"].shape == (5, 8)


def test_annotator_jsonl_and_folder_seeds(built, tmp_path):
  root = str(tmp_path / "manual")
  shutil.copytree(built[0], root)
  os.remove(os.path.join(root, "RewardEdit_20K.json"))
  os.remove(os.path.join(root, "seeds.json"))
  perspectives = {
      p: {"score": r["Score"], "failure": r["Negative Prompt"]}
      for p, r in zip(("following", "preserving", "quality"), GOOD_REWARD)
  }
  lines = [
      {"id": "k1", "status": "done", "perspectives": perspectives},
      {"id": "k2", "status": "done", "perspectives": perspectives},
      {"id": "k5:9", "status": "failed", "reason": "quality: no valid reply"},
      {
          "id": "k5:9",
          "status": "done",
          "perspectives": perspectives,
      },  # --retry_failed: the later wins
      {"id": "k6", "status": "failed", "reason": "following: the API rejected the request"},
      {"id": "k1x", "status": "done", "perspectives": {"following": perspectives["following"]}},
  ]
  with open(os.path.join(root, "rewards.jsonl"), "w") as handle:
    handle.write(
        "".join(json.dumps(line) + "\n" for line in lines) + '{"id": "k7", "sta'
    )  # torn tail
  builder = reward_edit.build(root, str(tmp_path / "tfds"))
  report = manual_dir.read_report(builder)
  assert report["kept"] == {"train": 3}
  assert report["skipped"]["train"] == {"failed_annotation": 1, "missing_perspective": 1}
  assert report["notes"] == {"several_seeds_took_smallest": 1}
  source = tfds.data_source("reward_edit", split="train", data_dir=str(tmp_path / "tfds"))
  assert {(r["id"], int(r["seed"])) for r in source} == {(b"k1", 5), (b"k2", 3), (b"k5:9", 9)}


def test_the_reward_file_must_be_unambiguous(built, tmp_path):
  root = str(tmp_path / "manual")
  shutil.copytree(built[0], root)
  write_json(os.path.join(root, "rewards.json"), {"k1": GOOD_REWARD})
  with pytest.raises(FileNotFoundError, match="exactly one of"):
    reward_edit.build(root, str(tmp_path / "tfds"))
  with pytest.raises(AssertionError, match="does not exist or is empty"):
    reward_edit.build(str(tmp_path / "nowhere"), str(tmp_path / "tfds2"))
