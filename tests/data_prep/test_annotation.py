"""Annotation through the real openai client against the toy judge server (and a mock Azure): the
online and batch runs, resuming, the output file and the released layout. Faults on chosen
requests are test_annotation_faults.py."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx2
import numpy as np
import openai
import pytest

from data_prep import (
    annotation,
    annotation_batch,
    annotation_items,
    annotation_records,
    annotation_summary,
    rewards,
)
from data_prep.toy import judge_server
from mre.judging import prompts
from mre.judging.client import Endpoint, JudgeClient, RetryPolicy
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


def test_annotation_of_a_toy_split_equals_the_judge(items, expected, tmp_path):
  output = str(tmp_path / "rewards.jsonl")
  with judge_server.serve_in_thread() as server:
    summary = annotation.annotate(
        items, output, make_client(server), "toy-judge", concurrency=4, progress=False
    )
    assert server.counts["requests"] == 3 * 48
  records = check_output(output, expected)
  assert all(
      r["model"] == "toy-judge"
      and r["via"] == "online"
      and all(len(r["raw"][p]) == 1 for p in annotation_records.PERSPECTIVES)
      for r in records
  )
  assert (summary.done, summary.failed, summary.skipped, summary.total_done) == (48, 0, 0, 48)
  assert summary.online_usage.prompt_tokens == sum(r["usage"]["prompt_tokens"] for r in records)
  assert summary.cost is None and "n/a" in summary.format()
  assert annotation_summary.estimate_cost("gpt-4o", summary.online_usage) == pytest.approx(
      (summary.online_usage.prompt_tokens * 2.5 + summary.online_usage.completion_tokens * 10) / 1e6
  )
  # A rerun finds nothing to do.
  with judge_server.serve_in_thread() as server:
    again = annotation.annotate(items, output, make_client(server), "toy-judge", progress=False)
    assert server.counts["requests"] == 0
  assert (again.done, again.skipped) == (0, 48)
  with pytest.raises(ValueError, match="holds annotations by 'toy-judge'"):
    annotation.annotate(items, output, make_client(server), "gpt-4o", progress=False)


def test_twenty_percent_faults_lose_and_duplicate_nothing(items, expected, tmp_path):
  output = str(tmp_path / "rewards.jsonl")
  # The timeout is far above an answer's time even on a loaded machine: only slow faults time out.
  faults = judge_server.Faults(
      rate_limit=0.07,
      server_error=0.05,
      slow=0.02,
      malformed=0.06,
      slow_seconds=1.5,
      retry_after_seconds=0.001,
      seed=7,
  )
  with judge_server.serve_in_thread(faults=faults) as server:
    summary = annotation.annotate(
        items,
        output,
        make_client(server, timeout=1.0),
        "toy-judge",
        concurrency=6,
        limit=36,
        progress=False,
    )
    counts = dict(server.counts)
  ids = [item.id for item in items][:36]
  records = check_output(output, expected, ids)
  stats = summary.stats
  assert counts["rate_limit"] == stats["retry_429"] and counts["server_error"] == stats["retry_500"]
  assert counts["slow"] == stats["retry_timeout"] and counts["malformed"] == stats["reasks"]
  assert (
      counts["requests"]
      == stats["requests"]
      == 3 * 36 + stats["retry_429"] + stats["retry_500"] + stats["retry_timeout"] + stats["reasks"]
  )
  assert 0.12 <= (counts["requests"] - 108) / counts["requests"] <= 0.3  # about 20% faults
  # A malformed reply stays in the record's raw texts, before the valid one.
  re_asked = [
      r for r in records if any(len(r["raw"][p]) > 1 for p in annotation_records.PERSPECTIVES)
  ]
  assert len(re_asked) >= 1 and summary.done == 36


def test_killed_run_resumes_with_each_id_once(jsonl_items, expected, tmp_path):
  output = tmp_path / "rewards.jsonl"
  env = dict(os.environ, TOY_JUDGE_KEY=KEY, PYTHONPATH=REPO)
  faults = judge_server.Faults(slow=1.0, slow_seconds=0.05)  # about 0.15 s per item
  with judge_server.serve_in_thread(faults=faults) as server:
    command = [
        sys.executable,
        "-m",
        "data_prep.annotate",
        f"--jsonl={jsonl_items}",
        f"--output={output}",
        f"--base_url={server.base_url}",
        "--model=toy-judge",
        "--api_key_env=TOY_JUDGE_KEY",
        "--concurrency=2",
        "--noprogress",
        "--verbosity=1",
    ]
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.time() + 60
    while time.time() < deadline and (not output.exists() or output.read_text().count("\n") < 6):
      time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    first_out, first_err = process.communicate(timeout=10)
    before = [r["id"] for r in rewards.read_records(str(output))[0]]
    assert process.returncode == -signal.SIGKILL and 6 <= len(before) < 48
    # A write cut short: the start of a record, no line end.
    torn = json.dumps({"id": "train_999999", "status": "done"})[:25]
    with open(output, "a") as handle:
      handle.write(torn)
    finished = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
  assert finished.returncode == 0, finished.stderr
  assert "cutting off a torn last line" in finished.stderr
  assert "annotated" in finished.stdout and "already done" in finished.stdout
  records = check_output(output, expected)
  assert [r["id"] for r in records[: len(before)]] == before  # appended to, never rewritten
  for text in (
      output.read_text(),
      finished.stdout,
      finished.stderr,
      first_out.decode(),
      first_err.decode(),
  ):
    assert KEY not in text


def test_batch_mode_gives_the_same_result_and_resumes(items, expected, tmp_path):
  output = str(tmp_path / "rewards.jsonl")
  with judge_server.serve_in_thread() as server:
    # Submit only (as if the run were stopped while the batches run), then collect.
    submitted = annotation_batch.annotate_batch(
        items,
        output,
        make_client(server),
        "toy-judge",
        limit=30,
        max_requests=27,
        wait=False,
        progress=False,
    )
    assert submitted.pending_batches == 4 and len(server.batches) == 4  # 9 items per batch
    state = json.load(open(output + ".batch.json"))
    assert [len(b["items"]) for b in state["batches"]] == [9, 9, 9, 3]
    assert all(b["state"] == "submitted" and b["batch_id"] for b in state["batches"])
    summary = annotation_batch.annotate_batch(
        items,
        output,
        make_client(server),
        "toy-judge",
        limit=30,
        max_requests=27,
        poll_seconds=0.02,
        progress=False,
    )
    assert (
        len(server.batches) == 4 and server.counts["requests"] == 0
    )  # no new batch, nothing online
  records = check_output(output, expected, [item.id for item in items][:30])
  assert all(r["via"] == "batch" and r["batch_usage"] == r["usage"] for r in records)
  assert all(
      r["instruction"] == next(i.instruction for i in items if i.id == r["id"]) for r in records
  )
  assert (summary.done, summary.pending_batches, summary.online_usage.total_tokens) == (30, 0, 0)
  assert all(b["state"] == "merged" for b in json.load(open(output + ".batch.json"))["batches"])
  # The rest of the split, online, into the same file: one file, each id once.
  with judge_server.serve_in_thread() as server:
    rest = annotation.annotate(items, output, make_client(server), "toy-judge", progress=False)
  assert (rest.done, rest.skipped) == (18, 30)
  check_output(output, expected)


@pytest.mark.parametrize("fallback", ["online", "fail"])
def test_invalid_batch_replies_are_asked_online_or_recorded_as_failed(
    fallback, items, expected, tmp_path, monkeypatch
):
  chosen = list(items)[:6]
  broken = chosen[2]  # its batch quality reply is malformed (the online one is fine)
  flat = np.full_like(chosen[0].original, 200)  # not a toy scene: the judge answers 400
  unjudgeable = annotation_items.Item("not_a_scene", chosen[0].instruction, flat, flat)
  answer_chat, target, calls = judge_server.answer_chat, prompts.image_data_url(broken.edited), []

  def flaky_answer(body):
    reply, usage = answer_chat(body)
    content = body["messages"][1]["content"]
    if "generation quality" in content[0]["text"] and content[-1]["image_url"]["url"] == target:
      calls.append(1)
      if len(calls) == 1:  # the first ask, from the batch
        return "Sorry, I cannot help with that.", usage
    return reply, usage

  monkeypatch.setattr(judge_server, "answer_chat", flaky_answer)
  output = str(tmp_path / "rewards.jsonl")
  with judge_server.serve_in_thread() as server:
    summary = annotation_batch.annotate_batch(
        chosen + [unjudgeable],
        output,
        make_client(server),
        "toy-judge",
        fallback=fallback,
        poll_seconds=0.02,
        progress=False,
    )
    online_requests = server.counts["requests"]
  records = {r["id"]: r for r in map(json.loads, open(output))}
  assert len(records) == 7 and sum(1 for _ in open(output)) == 7
  failed = records.pop("not_a_scene")
  assert failed["status"] == "failed" and "cannot judge this request" in failed["reason"]
  fixed = records[broken.id]
  assert fixed["raw"]["quality"][0] == "Sorry, I cannot help with that."
  if fallback == "online":
    assert all(r["status"] == "done" for r in records.values())
    assert fixed["via"] == "batch+online" and len(fixed["raw"]["quality"]) == 2
    assert fixed["perspectives"]["quality"] == {
        "score": expected[broken.id].quality.score,
        "failure": expected[broken.id].quality.failure,
    }
    assert online_requests == 2  # one re-ask for the broken reply, one for the unjudgeable item
    assert (summary.done, summary.failed) == (6, 1)
  else:
    assert fixed["status"] == "failed" and "quality: invalid batch reply" in fixed["reason"]
    assert fixed["perspectives"]["following"]["score"] == expected[broken.id].following.score
    assert online_requests == 0 and (summary.done, summary.failed) == (5, 2)
  assert summary.batch_usage.total_tokens > 0


def test_azure_requests_go_to_the_deployment_with_the_key_header(
    items, expected, tmp_path, monkeypatch
):
  monkeypatch.setenv("AZURE_OPENAI_API_KEY", KEY)
  seen = []

  def azure(request):
    seen.append(request)
    reply, usage = judge_server.answer_chat(json.loads(request.content))
    return httpx2.Response(200, json=judge_server.completion_body(reply, usage, "gpt-4o"))

  endpoint = Endpoint(
      provider="azure",
      azure_endpoint="https://mre-test.openai.azure.com",
      azure_deployment="judge-4o",
      api_version="2024-10-21",
  )
  client = endpoint.create_client(http_client=httpx2.Client(transport=httpx2.MockTransport(azure)))
  judge_client = JudgeClient(client, FAST, where=endpoint.describe(), secrets=[endpoint.api_key()])
  output = str(tmp_path / "rewards.jsonl")
  annotation.annotate(
      items,
      output,
      judge_client,
      "gpt-4o",
      request_model=endpoint.request_model("gpt-4o"),
      limit=4,
      progress=False,
  )
  check_output(output, expected, [item.id for item in items][:4])
  assert len(seen) == 12
  for request in seen:
    assert request.url.path == "/openai/deployments/judge-4o/chat/completions"
    assert request.url.params["api-version"] == "2024-10-21" and request.headers["api-key"] == KEY
    assert json.loads(request.content)["model"] == "judge-4o"
  assert KEY not in open(output).read()


def test_api_key_stays_out_of_records_and_logs(items, tmp_path, caplog):
  echo = f"Incorrect API key provided: {KEY}. You can find your API key at https://platform.openai.com."

  def handler(request):
    body = json.loads(request.content)
    if "Editing instruction" not in body["messages"][1]["content"][0]["text"]:
      return httpx2.Response(
          400, json={"error": {"message": echo, "type": "invalid_request_error"}}
      )
    reply, usage = judge_server.answer_chat(body)
    return httpx2.Response(200, json=judge_server.completion_body(reply, usage, "toy-judge"))

  client = openai.OpenAI(
      api_key=KEY,
      base_url="http://judge.test/v1",
      http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
  )
  output = str(tmp_path / "rewards.jsonl")
  with caplog.at_level("DEBUG"):
    summary = annotation.annotate(
        items,
        output,
        JudgeClient(client, FAST, secrets=[KEY]),
        "toy-judge",
        limit=3,
        progress=False,
    )
  records = [json.loads(line) for line in open(output)]
  assert summary.failed == 3 and all(
      "quality: the API rejected the request (400)" in r["reason"] for r in records
  )
  assert all("***" in r["reason"] for r in records)
  assert KEY not in open(output).read() and KEY not in caplog.text and KEY not in summary.format()


def test_unreachable_endpoint_stops_the_run_and_says_how_to_resume(jsonl_items, tmp_path):
  output = tmp_path / "rewards.jsonl"
  items = annotation_items.JsonlItems(jsonl_items)
  judge_client = JudgeClient.from_endpoint(
      Endpoint(provider="compatible", base_url="http://127.0.0.1:9/v1"),
      RetryPolicy(max_attempts=2, initial_delay=0.01),
  )
  with pytest.raises(
      annotation.AnnotationStopped, match="compatible http://127.0.0.1:9/v1 looks down"
  ) as stopped:
    annotation.annotate(items, str(output), judge_client, "toy-judge", progress=False)
  assert output.read_text() == "" and stopped.value.summary.failed == 0  # no item is blamed
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "data_prep.annotate",
          f"--jsonl={jsonl_items}",
          f"--output={output}",
          "--base_url=http://127.0.0.1:9/v1",
          "--max_attempts=2",
          "--initial_delay=0.01",
          "--noprogress",
      ],
      cwd=REPO,
      env=dict(os.environ, PYTHONPATH=REPO),
      capture_output=True,
      text=True,
      timeout=60,
  )
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "error: compatible http://127.0.0.1:9/v1 looks down" in result.stderr
  assert "no answer after 2 attempt(s)" in result.stderr and "connection error" in result.stderr
  last = result.stdout.strip().splitlines()[-1]
  assert (
      last.startswith("next: the run stopped early") and "rerun the same command to resume" in last
  )


def test_released_layout_export_and_import(items, expected, tmp_path):
  output = str(tmp_path / "rewards.jsonl")
  with judge_server.serve_in_thread() as server:
    annotation.annotate(items, output, make_client(server), "toy-judge", limit=5, progress=False)
  with open(output, "a") as handle:  # a failed item is not exported
    handle.write(
        json.dumps(
            {
                "id": "broken",
                "status": "failed",
                "reason": "x",
                "model": "toy-judge",
                "prompt_version": "v1",
                "usage": {},
            }
        )
        + "\n"
    )
  released = str(tmp_path / "RewardEdit_20K.json")
  assert annotation_records.export_released(output, released) == {"exported": 5, "skipped": 1}
  data = json.load(open(released))
  first = next(iter(data))
  verdicts = expected[first].verdicts
  assert data[first] == [
      {
          "Score": int(v.score) if float(v.score).is_integer() else v.score,
          "Negative Prompt": v.failure,
      }
      for v in verdicts
  ]
  data["bad_score"] = [{"Score": 7, "Negative Prompt": "x"}] * 3
  json.dump(data, open(released, "w"))
  imported = str(tmp_path / "imported.jsonl")
  assert annotation_records.import_released(released, imported) == {
      "imported": 5,
      "already_there": 0,
      "bad": 1,
  }
  assert annotation_records.import_released(released, imported)["already_there"] == 5
  ours, _ = rewards.load_rewards(output)
  again, problems = rewards.load_rewards(imported)
  from_json, json_problems = rewards.load_rewards(released)
  assert (
      ours == again == from_json
      and set(problems) == set()
      and json_problems["bad_score"].kind == "bad_score"
  )


def test_torn_lines_only_at_the_end(tmp_path):
  path = tmp_path / "a.jsonl"
  path.write_text('{"id": "a", "status": "done"}\n{"id": "b", "sta')
  records, intact = rewards.read_records(str(path))
  assert [r["id"] for r in records] == ["a"] and intact == len('{"id": "a", "status": "done"}\n')
  path.write_text('{"id": "a"}\nnot json\n{"id": "c"}\n')
  with pytest.raises(ValueError, match="a.jsonl:2: not an annotation record"):
    rewards.read_records(str(path))


def test_an_output_left_with_replaced_records_is_compacted_on_open(tmp_path):
  """A run killed after writing an id again, before compacting: the next open keeps the latest."""
  path = tmp_path / "rewards.jsonl"
  common = {"model": "toy-judge", "prompt_version": prompts.PROMPT_VERSION, "usage": {}}
  lines = [
      dict(common, id="a", status="failed", reason="x"),
      dict(common, id="b", status="done"),
      dict(common, id="a", status="done"),
  ]
  path.write_text("".join(json.dumps(r) + "\n" for r in lines))
  assert rewards.latest_records(str(path))["a"]["status"] == "done"  # what every reader takes
  with annotation_records.AnnotationLog(str(path), "toy-judge") as out:
    assert out.counts() == {"done": 2, "failed": 0}
  assert [json.loads(line) for line in open(path)] == [lines[2], lines[1]]
