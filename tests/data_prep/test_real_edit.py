import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_prep import manual_dir, real_edit
from data_prep.manual_dir import SkipExample
from mre.data.pipeline import EditPipeline, FeatureKeys, PipelineConfig
from tests.data_prep.manual_fixtures import make_real_edit


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("manual") / "real")
  make_real_edit(root)
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  return root, data_dir, real_edit.build(root, data_dir)


def test_counts_report_and_records(built):
  root, data_dir, builder = built
  report = manual_dir.read_report(builder)
  assert builder.info.splits["test"].num_examples == 13 and report["kept"] == {"test": 13}
  assert report["skipped"]["test"] == {
      "bad_category": 1,
      "missing_image": 7,
      "corrupt_image": 7,
      "unsafe_key": 2,
  }
  assert report["notes"]["images_without_7_instructions"] == 1
  assert [report["notes"][f"examples_{c}"] for c in real_edit.CATEGORIES] == [2, 2, 2, 2, 2, 1, 2]
  records = {
      r["id"].decode(): r for r in tfds.data_source("real_edit", split="test", data_dir=data_dir)
  }
  assert "a.jpg:5" not in records  # "Weather: ..." is no Real-Edit category
  assert collections.Counter(r["image_name"].decode() for r in records.values()) == {
      "a.jpg": 6,
      "b.png": 7,
  }
  a = [records[f"a.jpg:{k}"] for k in (0, 1, 2, 3)]
  assert [(r["category"], r["instruction"]) for r in a] == [
      (b"local", b"make the car red"),
      (b"remove", b"remove the dog"),
      (b"add", b"add a hat"),
      (b"texture", b"make the table wooden"),
  ]
  photo = np.asarray(Image.open(os.path.join(root, "Real-Edit", "a.jpg")).convert("RGB"))
  assert np.array_equal(a[0]["original"], photo) and photo.shape == (30, 40, 3)
  rgba = np.asarray(Image.open(os.path.join(root, "Real-Edit", "b.png")).convert("RGB"))
  assert np.array_equal(records["b.png:6"]["original"], rgba)  # RGBA stored as RGB


def test_grain_pipeline_reads_it(built):
  _, data_dir, _ = built
  source = tfds.data_source("real_edit", split="test", data_dir=data_dir)
  keys = FeatureKeys(
      edited="original", reward_scores=None, reward_texts=None
  )  # no edited image in a benchmark
  config = PipelineConfig(
      batch_size=13, resolution=16, shuffle=False, num_epochs=1, random_flip=False, keys=keys
  )
  batch = next(
      iter(EditPipeline(source, lambda texts: np.zeros((len(texts), 4), np.int32), config))
  )
  assert batch["original"].shape == (13, 16, 16, 3) and np.array_equal(
      batch["original"], batch["edited"]
  )


def test_instruction_formats():
  assert real_edit.parse_instruction("Style: as a Van Gogh painting") == (
      "style",
      "as a Van Gogh painting",
  )
  assert real_edit.parse_instruction("7. Global - make it  autumn") == ("global", "make it autumn")
  assert real_edit.parse_instruction({"category": "Background", "instruction": "a beach"}) == (
      "background",
      "a beach",
  )
  for bad, kind in (
      ("Change the sky: blue", "bad_instruction"),
      ("Zoom: closer", "bad_category"),
      ("Local:   ", "bad_instruction"),
      (3, "bad_instruction"),
  ):
    with pytest.raises(SkipExample) as error:
      real_edit.parse_instruction(bad)
    assert error.value.kind == kind


def test_command_line_build(tmp_path):
  root = str(tmp_path / "real")
  make_real_edit(root)
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "data_prep.build_dataset",
          "--dataset=real_edit",
          f"--manual_dir={root}",
          f"--data_dir={tmp_path / 'tfds'}",
      ],
      cwd=repo,
      env=dict(os.environ, PYTHONPATH=repo),
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert result.returncode == 0, result.stderr
  summary = json.loads(result.stdout[result.stdout.index("{") :])
  assert summary["kept"] == {"test": 13} and sum(summary["skipped"]["test"].values()) == 17
  assert os.path.exists(tmp_path / "tfds" / "real_edit" / "1.0.0" / "build_report.json")
