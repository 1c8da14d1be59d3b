"""Faults on chosen requests (issue 14), through the real openai client against the toy judge
server: every kind ends in a done item (transient) or a failed one naming the perspective
(persistent), and the run goes on; a dead endpoint stops the run without blaming items."""

import collections
import json
import os
import signal
import subprocess
import sys
import time

import httpx2
import openai
import pytest

from data_prep import annotation, annotation_items, annotation_records, rewards
from data_prep.toy import judge_server
from mre.judging.client import JudgeClient, RetryPolicy
# The fixtures are used by name (toy_dir through items).
from tests.data_prep.annotation_fixtures import (
    FAST,
    KEY,
    REPO,
    check_output,
    expected,
    items,  # noqa: F401
    jsonl_items,
    make_client,
    toy_dir,
)


TRANSIENT = judge_server.FAULT_KINDS  # each on the first ask of one question of one item
PERSISTENT = (
    "server_error",
    "unavailable",
    "rate_limit",
    "disconnect",
    "truncated",  # every ask
    "bool_score",
    "quoted_score",
    "nested",
)
BAD_LINES = [
    b"not json at all\n",
    b'{"id": 7, "instruction": "x", "original": "a.png", "edited": "b.png"}\n',
    b"[1, 2, 3]\n",
    b'{"id": "caf\xe9", "instruction": "x"}\n',
    b'{"id": "only an id"}\n',
]


def _fault_plan(items):
  """{edited image digest: (item, perspective, kind, persistent)} over items with distinct edits."""
  by_digest = {judge_server.image_digest(item.edited): item for item in items}
  chosen = list(by_digest.items())
  plan = {}
  for n, kind in enumerate(TRANSIENT):
    digest, item = chosen[n]
    plan[digest] = (item, annotation_records.PERSPECTIVES[n % 3], kind, False)
  for n, kind in enumerate(PERSISTENT):
    digest, item = chosen[len(TRANSIENT) + n]
    plan[digest] = (item, annotation_records.PERSPECTIVES[n % 3], kind, True)
  return plan


def _with_bad_lines(jsonl_items, folder):
  """The JSONL with its image paths made absolute and BAD_LINES spread through it; the bad lines'
  numbers."""
  root = os.path.dirname(jsonl_items)
  lines, bad = [], []
  for n, line in enumerate(open(jsonl_items)):
    entry = json.loads(line)
    entry["original"], entry["edited"] = (
        os.path.join(root, entry[k]) for k in ("original", "edited")
    )
    lines.append(json.dumps(entry).encode() + b"\n")
    if n % 9 == 4 and len(bad) < len(BAD_LINES):
      lines.append(BAD_LINES[len(bad)])
      bad.append(len(lines))
  path = folder / "triplets_with_bad_lines.jsonl"
  path.write_bytes(b"".join(lines))
  return str(path), bad


def test_each_fault_on_chosen_requests(items, expected, jsonl_items, tmp_path):
  plan = _fault_plan(items)

  def choose(request):
    item, perspective, kind, persistent = plan.get(request.edited, (None, None, None, None))
    if request.perspective == perspective and (persistent or request.attempt == 1):
      return kind
    return None

  path, bad_lines = _with_bad_lines(jsonl_items, tmp_path)
  output = str(tmp_path / "rewards.jsonl")
  policy = RetryPolicy(max_attempts=3, initial_delay=0.001, max_delay=0.01, reasks=2)
  # A timeout well above the judge's answer time (tens of ms), so that only the slow fault times out.
  faults = judge_server.Faults(choose=choose, slow_seconds=2.0, retry_after_seconds=0.001)
  with judge_server.serve_in_thread(faults=faults) as server:
    client = JudgeClient(
        openai.OpenAI(base_url=server.base_url, api_key="toy", timeout=1.0), policy, seed=0
    )
    summary = annotation.annotate(
        annotation_items.JsonlItems(path),
        output,
        client,
        "toy-judge",
        concurrency=4,
        progress=False,
    )
    counts = dict(server.counts)

  records = {r["id"]: r for r in map(json.loads, open(output))}
  assert len(records) == sum(1 for _ in open(output)) == 48  # the run went on past every fault
  for item, perspective, kind, persistent in plan.values():
    record = records[item.id]
    if persistent:  # failed, naming the perspective; the perspectives before it are kept
      assert record["status"] == "failed" and record["reason"].startswith(f"{perspective}: "), (
          kind,
          record,
      )
      reason = (
          "no answer after 3 attempt(s)"
          if kind in judge_server.TRANSPORT_FAULTS
          else "no valid reply in 3 asks"
      )
      assert reason in record["reason"], (kind, record["reason"])
      assert perspective not in record["perspectives"]
    else:
      assert record["status"] == "done", (kind, record.get("reason"))
  done = [r for r in records.values() if r["status"] == "done"]
  _check_scores(done, expected)
  assert (summary.done, summary.failed, summary.skipped) == (40, 8, 0)
  # done + failed + skipped + bad = the input's lines; each bad line is listed with its number.
  assert (
      summary.accounted == summary.read == 48 + len(BAD_LINES) == sum(1 for _ in open(path, "rb"))
  )
  assert [b.where for b in summary.bad_input] == [f"{path}:{n}" for n in bad_lines]
  reasons = [b.reason for b in summary.bad_input]
  assert "not JSON" in reasons[0] and "id is a int" in reasons[1] and "got a list" in reasons[2]
  assert "not UTF-8" in reasons[3] and "missing instruction, original, edited" in reasons[4]
  # Every injected fault was seen and counted by the client.
  stats = summary.stats
  retried = {
      "rate_limit": "retry_429",
      "server_error": "retry_500",
      "unavailable": "retry_503",
      "disconnect": "retry_connection",
      "truncated": "retry_bad_body",
      "slow": "retry_timeout",
  }
  for kind, stat in retried.items():
    assert stats[stat] == counts[kind] > 0, kind
  answer_faults = sum(counts[k] for k in judge_server.ANSWER_FAULTS)
  assert (
      stats["reasks"] == answer_faults - 3
  )  # the three persistent answer faults' last asks end the item
  assert stats["gave_up"] == 5 and stats["requests"] == counts["requests"]
  text = summary.format()
  assert f"bad input {path}:{bad_lines[0]}: the line is not JSON" in text
  assert (
      text.splitlines()[-1].startswith("next: 8 item(s) in the output failed")
      and "--retry_failed" in text
  )
  assert "fix the 5 bad input line(s)" in text.splitlines()[-1]

  # --retry_failed asks the failed items again; the file is compacted to one record per id.
  with judge_server.serve_in_thread() as server:
    again = annotation.annotate(
        annotation_items.JsonlItems(path),
        output,
        make_client(server),
        "toy-judge",
        retry_failed=True,
        progress=False,
    )
    assert server.counts["requests"] == 8 * 3  # a failed item is asked all three questions again
  assert (again.done, again.failed, again.skipped, again.total_done) == (8, 0, 40, 48)
  records = check_output(output, expected)
  assert all(r["via"] == "online" for r in records)
  assert (
      again.format().splitlines()[-1]
      == "next: fix the 5 bad input line(s) listed above (or in the log) "
      "and rerun to annotate them."
  )


def _check_scores(records, expected):
  """Recorded scores are JSON numbers (never a bool or a string) and equal the judge's."""
  for record in records:
    for p, verdict in zip(annotation_records.PERSPECTIVES, expected[record["id"]].verdicts):
      score = record["perspectives"][p]["score"]
      assert type(score) in (int, float) and score == verdict.score, (record["id"], p, score)
      assert record["perspectives"][p]["failure"] == verdict.failure


def test_a_dead_endpoint_stops_the_run_without_blaming_items(items, expected, tmp_path):
  """The judge dies mid-run: the requests in flight give up together, the run stops, no item is
  recorded as failed, and a rerun finishes the rest."""
  alive = [25]

  def choose(request):
    alive[0] -= 1
    return "unavailable" if alive[0] < 0 else None

  output = str(tmp_path / "rewards.jsonl")
  policy = RetryPolicy(max_attempts=3, initial_delay=0.001, max_delay=0.01)
  with judge_server.serve_in_thread(
      faults=judge_server.Faults(choose=choose, retry_after_seconds=0.001)
  ) as server:
    client = JudgeClient(openai.OpenAI(base_url=server.base_url, api_key="toy"), policy, seed=0)
    with pytest.raises(
        annotation.AnnotationStopped, match="looks down: requests gave up"
    ) as stopped:
      annotation.annotate(items, output, client, "toy-judge", concurrency=4, progress=False)
  summary = stopped.value.summary
  records = [json.loads(line) for line in open(output)]
  assert (
      summary.failed == 0 and all(r["status"] == "done" for r in records) and 0 < len(records) < 48
  )
  assert summary.format().splitlines()[-1].startswith("next: the run stopped early (")
  with judge_server.serve_in_thread() as server:
    rest = annotation.annotate(items, output, make_client(server), "toy-judge", progress=False)
  assert (rest.done, rest.skipped) == (48 - len(records), len(records))
  check_output(output, expected)


def test_a_kill_during_the_batch_fallback_keeps_the_batch_answers(
    jsonl_items, expected, tmp_path, monkeypatch
):
  """The batch answers two items only in part; the run is SIGKILLed while it asks the missing
  questions online. The rerun asks exactly those questions (1 + 2), not all three of each item."""
  chosen = list(annotation_items.JsonlItems(jsonl_items))[:6]
  broken = {
      judge_server.image_digest(annotation_items.load_image(chosen[1].edited, "edited")): {
          "quality"
      },
      judge_server.image_digest(annotation_items.load_image(chosen[4].edited, "edited")): {
          "preserving",
          "quality",
      },
  }
  answer_chat, asked = judge_server.answer_chat, collections.Counter()

  def batch_answers_spoilt(
      body,
  ):  # the first answer of a broken question (the batch's) is malformed
    reply, usage = answer_chat(body)
    _, perspective, _, edited = judge_server.describe_request(body)
    asked[edited, perspective] += 1
    if perspective in broken.get(edited, ()) and asked[edited, perspective] == 1:
      return "I would rather not say.", usage
    return reply, usage

  monkeypatch.setattr(judge_server, "answer_chat", batch_answers_spoilt)
  slow = [True]
  faults = judge_server.Faults(choose=lambda request: "slow" if slow[0] else None, slow_seconds=20)
  output = tmp_path / "rewards.jsonl"
  with judge_server.serve_in_thread(faults=faults) as server:
    command = [
        sys.executable,
        "-m",
        "data_prep.annotate",
        f"--jsonl={jsonl_items}",
        f"--output={output}",
        f"--base_url={server.base_url}",
        "--model=toy-judge",
        "--batch",
        "--poll_seconds=0.05",
        "--limit=6",
        "--concurrency=2",
        "--noprogress",
    ]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while (
        server.counts["requests"] < 2 and time.time() < deadline
    ):  # both online questions in flight
      time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    state = json.load(open(str(output) + ".batch.json"))
    assert {
        i: sorted(p for p, r in a["replies"].items() if r["value"] is None)
        for i, a in state["answers"].items()
    } == {chosen[1].id: ["quality"], chosen[4].id: ["preserving", "quality"]}
    assert len(rewards.read_records(str(output))[0]) == 4  # the fully answered items
    slow[0] = False
    before = server.counts["requests"]
    finished = subprocess.run(
        command,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 0, finished.stderr
    assert server.counts["requests"] - before == 3 and len(server.batches) == 1
  records = {r["id"]: r for r in check_output(output, expected, [item.id for item in chosen])}
  assert records[chosen[4].id]["via"] == "batch+online"
  assert records[chosen[4].id]["raw"]["preserving"][0] == "I would rather not say."
  assert json.load(open(str(output) + ".batch.json"))["answers"] == {}


def test_a_reply_with_a_lone_surrogate_is_re_asked_and_kept(items, expected, tmp_path):
  """JSON can carry a lone surrogate, which UTF-8 cannot: the failure text is rejected, and the raw
  reply is still written (as an ASCII escape) without stopping the run."""
  spoilt = '{"score": 3, "failure": "' + chr(0xD800) + ' broken"}'
  replies = []

  def handler(request):
    reply, usage = judge_server.answer_chat(json.loads(request.content))
    replies.append(spoilt if not replies else reply)
    body = json.dumps(
        judge_server.completion_body(replies[-1], usage, "toy-judge")
    )  # "\ud800" escaped
    return httpx2.Response(200, content=body.encode(), headers={"content-type": "application/json"})

  client = openai.OpenAI(
      api_key=KEY,
      base_url="http://judge.test/v1",
      http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
  )
  output = str(tmp_path / "rewards.jsonl")
  summary = annotation.annotate(
      items, output, JudgeClient(client, FAST), "toy-judge", limit=1, progress=False
  )
  assert summary.done == 1 and len(replies) == 4  # one re-ask
  record = check_output(output, expected, [next(iter(items)).id])[0]
  assert record["raw"]["following"][0] == spoilt
