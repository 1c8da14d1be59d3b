"""Soak: the annotator against the toy judge server with >= 30% faulty replies of every kind (and a
share of requests that fail every time), SIGKILLed twice, rerun to the end, then rerun with
--retry_failed. Counts what a user cares about: items done, failed, lost, duplicated, wrongly
accepted, and requests per item.

    python -m tests.data_prep.test_soak --items=1000        # the numbers README quotes
    MRE_SLOW=1 python -m pytest -q -m slow tests/data_prep/test_soak.py   # the same, as a test

Minutes, not seconds: it is marked slow and skipped unless MRE_SLOW=1.
"""

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from PIL import Image

from data_prep import annotation
from data_prep.toy import flaws, instructions, judge, judge_server, scenes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PERSPECTIVES = annotation.PERSPECTIVES


def make_items(folder: str, count: int, seed: int = 31) -> tuple[str, dict, dict]:
  """A JSONL of `count` flawed toy triplets (PNG files beside it), id -> the judge's verdicts, and
  id -> the digest of its edited image (judge_server.image_digest)."""
  expected, digests = {}, {}
  path = os.path.join(folder, "triplets.jsonl")
  with open(path, "w") as handle:
    for i in range(count):
      rng = np.random.default_rng([seed, i])
      scene = scenes.random_scene(rng)
      sample = instructions.sample_edit(rng, scene)
      original, edited = (
          scenes.render(scene),
          flaws.make_flawed_target(rng, scene, sample, flaws.FlawMix()).image,
      )
      item_id = f"soak_{i:05d}"
      for name, image in (("original", original), ("edited", edited)):
        Image.fromarray(image).save(os.path.join(folder, f"{item_id}_{name}.png"))
      handle.write(
          json.dumps(
              {
                  "id": item_id,
                  "instruction": sample.instruction,
                  "original": f"{item_id}_original.png",
                  "edited": f"{item_id}_edited.png",
              }
          )
          + "\n"
      )
      expected[item_id] = judge.judge(sample.instruction, original, edited).verdicts
      digests[item_id] = judge_server.image_digest(edited)
  return path, expected, digests


def _lines(path: str) -> int:
  if not os.path.exists(path):
    return 0
  with open(path, "rb") as handle:
    return handle.read().count(b"\n")


def run_soak(
    folder: str,
    count: int = 1000,
    fault_rate: float = 0.31,
    persistent: float = 0.01,
    seed: int = 5,
    log=print,
) -> dict:
  jsonl, expected, digests = make_items(folder, count)
  output = os.path.join(folder, "rewards.jsonl")
  faults = judge_server.Faults.spread(
      fault_rate, persistent=persistent, slow_seconds=3.0, retry_after_seconds=0.01, seed=seed
  )
  env = dict(os.environ, PYTHONPATH=REPO)
  started = time.time()
  with judge_server.serve_in_thread(faults=faults) as server:
    command = [
        sys.executable,
        "-m",
        "data_prep.annotate",
        f"--jsonl={jsonl}",
        f"--output={output}",
        f"--base_url={server.base_url}",
        "--model=toy-judge",
        "--concurrency=8",
        "--timeout=2",
        "--max_attempts=6",
        "--initial_delay=0.05",
        "--max_delay=0.5",
        "--reasks=3",
        "--noprogress",
    ]
    kills = []
    for fraction in (1 / 3, 2 / 3):  # two SIGKILLs, mid-run
      process = subprocess.Popen(
          command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
      )
      while _lines(output) < fraction * count and process.poll() is None:
        time.sleep(0.05)
      process.send_signal(signal.SIGKILL)
      process.wait()
      kills.append(_lines(output))
      log(f"SIGKILL with {kills[-1]} lines written")
    finish = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    log(finish.stdout)
    after_finish = {r["id"]: r for r in map(json.loads, open(output))}
    retry = subprocess.run(
        command + ["--retry_failed"], cwd=REPO, env=env, capture_output=True, text=True
    )
    log(retry.stdout)
    counts, persistent_questions = dict(server.counts), set(server.persistent_questions)

  records = [json.loads(line) for line in open(output)]
  lines = collections.Counter(r["id"] for r in records)
  done = [r for r in records if r["status"] == "done"]
  failed = [r for r in records if r["status"] == "failed"]
  wrong = [
      r["id"]
      for r in done
      if [r["perspectives"][p] for p in PERSPECTIVES]
      != [{"score": v.score, "failure": v.failure} for v in expected[r["id"]]]
      or any(type(r["perspectives"][p]["score"]) not in (int, float) for p in PERSPECTIVES)
  ]
  faulty = sum(counts[kind] for kind in judge_server.FAULT_KINDS)
  # A failed item whose failing question always fails (a persistent fault), or one that failed by
  # chance (the same question faulty on every ask) and was annotated by --retry_failed.
  always_failing = {
      i for i in expected if any((digests[i], p) in persistent_questions for p in PERSPECTIVES)
  }
  first_failed = {i for i, r in after_finish.items() if r["status"] == "failed"}
  return {
      "items": count,
      "kills": kills,
      "exit codes": (finish.returncode, retry.returncode),
      "done": len(done),
      "failed": len(failed),
      "failed after the first full run": len(first_failed),
      "failed, with a question that always fails": len({r["id"] for r in failed} & always_failing),
      "items with a question that always fails": len(always_failing),
      "failed by chance in the first full run": sorted(
          after_finish[i]["reason"] for i in first_failed - always_failing
      ),
      "failed reasons naming a perspective": sum(
          1 for r in failed if r["reason"].split(":")[0] in PERSPECTIVES
      ),
      "lost": len(expected.keys() - lines.keys()),
      "duplicated": sum(c - 1 for c in lines.values()),
      "wrongly accepted": len(wrong),
      "requests": counts["requests"],
      "requests per item": counts["requests"] / count,
      "faulty replies": faulty,
      "fault share": faulty / counts["requests"],
      "persistent fault replies": counts["persistent"],
      "per kind": {kind: counts[kind] for kind in judge_server.FAULT_KINDS},
      "minutes": (time.time() - started) / 60,
      "next step": retry.stdout.strip().splitlines()[-1] if retry.stdout.strip() else "",
  }


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MRE_SLOW"), reason="minutes long: set MRE_SLOW=1 to run it")
def test_soak_loses_duplicates_and_wrongly_accepts_nothing(tmp_path):
  numbers = run_soak(
      str(tmp_path), count=int(os.environ.get("MRE_SOAK_ITEMS", 1000)), log=lambda text: None
  )
  assert numbers["exit codes"] == (0, 0)
  assert numbers["lost"] == numbers["duplicated"] == numbers["wrongly accepted"] == 0
  assert numbers["done"] + numbers["failed"] == numbers["items"]
  assert numbers["failed reasons naming a perspective"] == numbers["failed"]
  assert numbers["fault share"] >= 0.30 and min(numbers["per kind"].values()) > 0
  assert numbers["failed"] <= 0.1 * numbers["items"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--items", type=int, default=1000)
  parser.add_argument("--fault_rate", type=float, default=0.31)
  parser.add_argument("--persistent", type=float, default=0.01)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as folder:
    numbers = run_soak(folder, args.items, args.fault_rate, args.persistent)
  print(json.dumps(numbers, indent=1))


if __name__ == "__main__":
  main()
