import json
import re
import threading
import time

import httpx2
import openai
import pytest

from mre.judging import prompts
from mre.judging.client import (
    Endpoint,
    JudgeClient,
    JudgeConfigError,
    JudgeUnavailable,
    RetryPolicy,
    Usage,
    run_concurrently,
)

KEY = "sk-test-0123456789-never-to-be-seen"
GOOD = '{"score": 4.5, "failure": "the cup stayed red"}'
BODY = {
    "model": "gpt-4o",
    "messages": [{"role": "user", "content": "Judge prompt v1: annotation / generation quality"}],
}


def _completion(text, prompt_tokens=100, completion_tokens=10):
  return {
      "id": "chatcmpl-1",
      "object": "chat.completion",
      "created": 0,
      "model": "gpt-4o",
      "choices": [
          {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
      ],
      "usage": {
          "prompt_tokens": prompt_tokens,
          "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens,
      },
  }


def _scripted(responses):
  """A client whose HTTP answers come from `responses`, one per request: (status, json, headers)."""
  seen = []

  def handler(request):
    seen.append(request)
    status, payload, headers = responses[min(len(seen), len(responses)) - 1]
    return httpx2.Response(status, json=payload, headers=headers)

  client = openai.OpenAI(
      api_key=KEY,
      base_url="http://judge.test/v1",
      http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
  )
  return client, seen


def _error(message, kind="server_error", code=None):
  return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def test_backoff_is_exponential_with_jitter_and_capped():
  policy = RetryPolicy(initial_delay=1.0, max_delay=10.0)
  assert [policy.backoff(k, 0.0) for k in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 4.0, 5.0]
  assert [policy.backoff(k, 0.999999) for k in (1, 2, 5)] == pytest.approx([1.0, 2.0, 10.0])


def test_retry_after_is_honoured_and_retries_are_counted():
  client, seen = _scripted(
      [
          (429, _error("slow down", "rate_limit_error"), {"retry-after-ms": "250"}),
          (503, _error("busy"), {"retry-after": "2"}),
          (200, _completion(GOOD), {}),
      ]
  )
  sleeps = []
  judge = JudgeClient(client, RetryPolicy(), sleep=sleeps.append, seed=0)
  reply = judge.ask(BODY, prompts.parse_annotation_reply)
  assert reply.ok and reply.value == prompts.Annotation(4.5, "the cup stayed red")
  assert reply.requests == 3 and len(seen) == 3
  assert 0.25 <= sleeps[0] <= 0.275 and 2.0 <= sleeps[1] <= 2.2  # server's wait, plus at most 10%
  assert (
      judge.stats["retry_429"] == 1
      and judge.stats["retry_503"] == 1
      and judge.stats["requests"] == 3
  )


def test_total_wait_is_capped_then_the_request_gives_up():
  overloaded = (503, _error("overloaded"), {"retry-after": "10"})
  client, seen = _scripted(
      [(200, _completion(GOOD), {})] + [overloaded] * 3 + [(200, _completion(GOOD), {})]
  )
  sleeps = []
  judge = JudgeClient(
      client,
      RetryPolicy(max_attempts=10, max_total_wait=25.0),
      sleep=sleeps.append,
      evidence_grace=0.01,
  )
  assert judge.ask(BODY, prompts.parse_annotation_reply).ok  # the endpoint has answered once
  reply = judge.ask(BODY, prompts.parse_annotation_reply)
  assert not reply.ok and reply.requests == 3 and len(seen) == 5  # the last: a probe, answered
  assert re.fullmatch(
      r"no answer after 3 attempt\(s\) and 2\d\.\d s of waiting; last error: HTTP 503.*",
      reply.error,
  )
  assert len(sleeps) == 2 and sum(sleeps) <= 25.0 and judge.stats["gave_up"] == 1


def test_auth_quota_and_bad_requests_are_not_retried_and_the_key_is_blanked():
  echo = f"Incorrect API key provided: {KEY}."
  client, seen = _scripted([(401, _error(echo, "invalid_request_error", "invalid_api_key"), {})])
  judge = JudgeClient(client, RetryPolicy(), secrets=[KEY], sleep=lambda s: None)
  with pytest.raises(JudgeConfigError) as error:
    judge.ask(BODY, prompts.parse_annotation_reply)
  assert (
      "answered 401" in str(error.value)
      and KEY not in str(error.value)
      and "***" in str(error.value)
  )
  assert len(seen) == 1

  client, seen = _scripted(
      [
          (
              429,
              _error("You exceeded your current quota", "insufficient_quota", "insufficient_quota"),
              {},
          )
      ]
  )
  with pytest.raises(JudgeConfigError, match="out of quota"):
    JudgeClient(client, RetryPolicy(), sleep=lambda s: None).ask(
        BODY, prompts.parse_annotation_reply
    )
  assert len(seen) == 1

  client, seen = _scripted([(400, _error(f"image too large ({KEY})", "invalid_request_error"), {})])
  reply = JudgeClient(client, RetryPolicy(), secrets=[KEY]).ask(
      BODY, prompts.parse_annotation_reply
  )
  assert (
      not reply.ok
      and "rejected the request (400): image too large" in reply.error
      and KEY not in reply.error
  )
  assert len(seen) == 1


def test_malformed_replies_are_re_asked_then_fail_with_the_reason():
  client, seen = _scripted(
      [
          (200, _completion("I cannot rate images."), {}),
          (200, _completion(""), {}),
          (200, _completion(GOOD, 50, 5), {}),
      ]
  )
  reply = JudgeClient(client, RetryPolicy(reasks=2)).ask(BODY, prompts.parse_annotation_reply)
  assert reply.ok and reply.texts == ("I cannot rate images.", GOOD)  # the empty reply has no text
  assert reply.usage == Usage(250, 25) and reply.requests == 3

  client, seen = _scripted([(200, _completion('{"score": 9, "failure": "x"}'), {})])
  judge = JudgeClient(client, RetryPolicy(reasks=1))
  reply = judge.ask(BODY, prompts.parse_annotation_reply)
  assert not reply.ok and len(seen) == 2 and judge.stats["reasks"] == 1
  assert reply.error.startswith("no valid reply in 2 asks; last:") and "outside 0..5" in reply.error


def test_a_dead_endpoint_is_reported_clearly():
  endpoint = Endpoint(provider="compatible", base_url="http://127.0.0.1:9/v1", timeout=2.0)
  judge = JudgeClient.from_endpoint(
      endpoint, RetryPolicy(max_attempts=3, initial_delay=0.01), evidence_grace=0.05
  )
  start = time.time()
  # It never answered, and no other request could show that it works: down at the first give-up.
  with pytest.raises(
      JudgeUnavailable,
      match=r"compatible http://127.0.0.1:9/v1 looks down: it has not answered "
      r"any request yet \(last: no answer after 3 attempt.*connection error",
  ):
    judge.ask(BODY, prompts.parse_annotation_reply)
  assert time.time() - start < 5 and judge.stats["retry_connection"] == 3
  with pytest.raises(JudgeUnavailable, match="looks down"):  # later requests are not sent
    judge.ask(BODY, prompts.parse_annotation_reply)
  assert judge.stats["requests"] == 3


def test_a_request_that_gives_up_is_checked_with_the_last_answered_one():
  """One request keeps failing: the last request the endpoint answered is sent again. Answered,
  the request fails alone; not answered, the endpoint is down."""
  client, seen = _scripted(
      [
          (200, _completion(GOOD), {}),
          (500, _error("boom"), {}),
          (500, _error("boom"), {}),
          (200, _completion(GOOD), {}),
      ]
      + [(503, _error("down"), {})] * 20
  )
  judge = JudgeClient(
      client, RetryPolicy(max_attempts=2), sleep=lambda s: None, evidence_grace=0.01
  )
  first = {**BODY, "model": "first"}
  assert judge.ask(first, prompts.parse_annotation_reply).ok
  reply = judge.ask(BODY, prompts.parse_annotation_reply)
  assert (
      not reply.ok and "last error: HTTP 500 (boom)" in reply.error and judge.stats["probes"] == 1
  )
  assert json.loads(seen[3].content)["model"] == "first"  # the probe
  with pytest.raises(
      JudgeUnavailable,
      match="looks down: requests gave up, and the last request it answered, "
      r"sent again, got no answer either \(last: .*HTTP 503 \(down\)",
  ):
    judge.ask(BODY, prompts.parse_annotation_reply)
  assert len(seen) == 4 + 2 + 2 and judge.stats["probes"] == 2


def test_unreadable_200_bodies_are_retried_like_disconnects():
  """A body cut off halfway (the openai client raises JSONDecodeError), an HTML page from a proxy,
  a JSON value that is no completion and a body nested past the decoder's limit: all transport
  faults, retried; then the answer is used."""
  good = _completion(GOOD)
  bodies = [
      b'{"id": "chatcmpl-1", "choices": [{"mess',
      b"<html>Bad gateway</html>",
      b"[]",
      b"[" * 100_000 + b"]" * 100_000,
      json.dumps(good).encode(),
  ]
  seen = []

  def handler(request):
    seen.append(request)
    body = bodies[len(seen) - 1]
    kind = "text/html" if body.startswith(b"<") else "application/json"
    return httpx2.Response(200, content=body, headers={"content-type": kind})

  client = openai.OpenAI(
      api_key=KEY,
      base_url="http://judge.test/v1",
      http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
  )
  judge = JudgeClient(client, RetryPolicy(), sleep=lambda s: None)
  reply = judge.ask(BODY, prompts.parse_annotation_reply)
  assert (
      reply.ok
      and reply.requests == 5
      and judge.stats["retry_bad_body"] == 4
      and judge.stats["reasks"] == 0
  )


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"choices": "x"},
        {"choices": [1]},
        {"choices": [{"message": "x"}]},
        {"choices": [{"message": {"content": 5}}], "usage": {"prompt_tokens": "a"}},
    ],
)
def test_completions_without_a_usable_message_are_re_asked(body):
  client, seen = _scripted([(200, body, {}), (200, _completion(GOOD), {})])
  judge = JudgeClient(client, RetryPolicy(reasks=1))
  reply = judge.ask(BODY, prompts.parse_annotation_reply)
  assert (
      reply.ok and len(seen) == 2 and judge.stats["reasks"] == 1 and reply.usage == Usage(100, 10)
  )


def test_endpoints_read_keys_from_the_environment_only(monkeypatch):
  monkeypatch.delenv("OPENAI_API_KEY", raising=False)
  with pytest.raises(JudgeConfigError, match="set the environment variable OPENAI_API_KEY"):
    Endpoint().api_key()
  monkeypatch.setenv("MY_JUDGE_KEY", KEY)
  assert Endpoint(api_key_env="MY_JUDGE_KEY").api_key() == KEY
  assert Endpoint(provider="compatible", base_url="http://x/v1").api_key() == "EMPTY"
  with pytest.raises(ValueError, match="azure_endpoint and api_version"):
    Endpoint(provider="azure")
  azure = Endpoint(
      provider="azure",
      azure_endpoint="https://r.openai.azure.com",
      azure_deployment="dep",
      api_version="2024-10-21",
  )
  assert azure.batch_url == "/chat/completions" and azure.request_model("gpt-4o") == "dep"
  assert (
      Endpoint().batch_url == "/v1/chat/completions"
      and Endpoint().request_model("gpt-4o") == "gpt-4o"
  )
  assert KEY not in repr(Endpoint(api_key_env="MY_JUDGE_KEY"))


def test_run_concurrently_bounds_work_and_reads_items_lazily():
  running, most, drawn, lock = [0], [0], [0], threading.Lock()

  def items():
    for i in range(20):
      drawn[0] += 1
      yield i

  def work(i):
    with lock:
      running[0] += 1
      most[0] = max(most[0], running[0])
    time.sleep(0.01)
    with lock:
      running[0] -= 1
    if i == 13:
      raise ValueError("item 13 is bad")
    return i * i

  results, errors = {}, []
  for finished, (i, future) in enumerate(run_concurrently(work, items(), 3), start=1):
    assert drawn[0] <= finished + 2  # items are drawn as threads free up, not all at once
    if future.exception():
      errors.append(str(future.exception()))
    else:
      results[i] = future.result()
  assert (
      most[0] == 3
      and results == {i: i * i for i in range(20) if i != 13}
      and errors == ["item 13 is bad"]
  )
