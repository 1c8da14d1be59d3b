"""What the annotation tests share: the tiny toy split as items (TFDS and JSONL), the toy judge's
verdicts on them, a judge client and the check of an output file against those verdicts."""

import collections
import json
import os

import openai
import pytest
from PIL import Image

from data_prep import toy_edit
from data_prep.annotation_items import TfdsItems
from data_prep.annotation_records import PERSPECTIVES
from data_prep.toy import judge
from mre.judging.client import JudgeClient, RetryPolicy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEY = "sk-toy-7f3a9c1e5b-secret-key"
FAST = RetryPolicy(max_attempts=10, initial_delay=0.001, max_delay=0.05, reasks=4)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tfds"))
  toy_edit.ensure_built(directory, "tiny")
  return directory


@pytest.fixture(scope="module")
def items(toy_dir):
  return TfdsItems("toy_edit/tiny", "train", toy_dir)


@pytest.fixture(scope="module")
def expected(items):
  """id -> the toy judge's verdicts, called directly."""
  return {item.id: judge.judge(item.instruction, item.original, item.edited) for item in items}


@pytest.fixture(scope="module")
def jsonl_items(items, tmp_path_factory):
  """The same triplets as a JSONL with PNG files (what the command line reads without TFDS)."""
  folder = tmp_path_factory.mktemp("jsonl")
  with open(folder / "triplets.jsonl", "w") as handle:
    for item in items:
      for name in ("original", "edited"):
        Image.fromarray(getattr(item, name)).save(folder / f"{item.id}_{name}.png")
      handle.write(
          json.dumps(
              {
                  "id": item.id,
                  "instruction": item.instruction,
                  "original": f"{item.id}_original.png",
                  "edited": f"{item.id}_edited.png",
              }
          )
          + "\n"
      )
  return str(folder / "triplets.jsonl")


def make_client(server, **options):
  return JudgeClient(
      openai.OpenAI(base_url=server.base_url, api_key="toy", **options), FAST, seed=0
  )


def check_output(path, expected, ids=None):
  """Every line a done record, each id once, equal to the judge's verdicts; returns the records."""
  with open(path) as handle:
    records = [json.loads(line) for line in handle]
  counts = collections.Counter(r["id"] for r in records)
  assert max(counts.values()) == 1, [i for i, c in counts.items() if c > 1]
  assert set(counts) == set(ids if ids is not None else expected)
  for record in records:
    verdicts = expected[record["id"]].verdicts
    assert record["status"] == "done" and record["prompt_version"] == "v1"
    assert [record["perspectives"][p] for p in PERSPECTIVES] == [
        {"score": v.score, "failure": v.failure} for v in verdicts
    ]
    assert record["usage"]["prompt_tokens"] > 3 * 85 and record["usage"]["completion_tokens"] > 0
  return records
