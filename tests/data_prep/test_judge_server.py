import json
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest

from data_prep.toy import flaws, instructions, judge, judge_server, scenes
from mre.judging import prompts


def _triples(count, seed=21):
  out = []
  for i in range(count):
    rng = np.random.default_rng([seed, i])
    scene = scenes.random_scene(rng)
    sample = instructions.sample_edit(rng, scene)
    target = flaws.make_flawed_target(rng, scene, sample, flaws.FlawMix(0.6, 0.6, 0.6))
    out.append((sample.instruction, scenes.render(scene), target.image))
  return out


def _ask(client, form, perspective, triple):
  instruction, original, edited = triple
  response = client.chat.completions.create(
      **prompts.chat_request(judge_server.MODEL, form, perspective, instruction, original, edited)
  )
  return response


def test_openai_client_gets_both_answer_forms():
  triple = _triples(1)[0]
  expected = judge.judge(*triple)
  with judge_server.serve_in_thread() as server:
    client = openai.OpenAI(base_url=server.base_url, api_key="toy", max_retries=0)
    for k, perspective in enumerate(prompts.PERSPECTIVES):
      verdict = expected.verdicts[k]
      response = _ask(client, "annotation", perspective, triple)
      assert response.model == judge_server.MODEL and response.id.startswith("chatcmpl-")
      assert response.choices[0].finish_reason == "stop"
      assert response.usage.prompt_tokens > 85 and response.usage.completion_tokens > 0
      assert (
          response.usage.total_tokens
          == response.usage.prompt_tokens + response.usage.completion_tokens
      )
      annotation = prompts.parse_annotation_reply(response.choices[0].message.content)
      assert annotation == prompts.Annotation(verdict.score, verdict.failure)
      evaluation = prompts.parse_evaluation_reply(
          perspective, _ask(client, "evaluation", perspective, triple).choices[0].message.content
      )
      assert evaluation == prompts.Evaluation(verdict.yes, verdict.score)


def test_faults_at_20_percent_are_absorbed_by_client_retries():
  triples = _triples(12)
  faults = judge_server.Faults(rate_limit=0.1, server_error=0.1, seed=5)
  with judge_server.serve_in_thread(faults=faults) as server:
    client = openai.OpenAI(base_url=server.base_url, api_key="toy", max_retries=8)
    for triple in triples:
      expected = judge.judge(*triple)
      for k, perspective in enumerate(prompts.PERSPECTIVES):
        reply = _ask(client, "evaluation", perspective, triple).choices[0].message.content
        assert prompts.parse_evaluation_reply(perspective, reply) == prompts.Evaluation(
            expected.verdicts[k].yes, expected.verdicts[k].score
        )
    counts = dict(server.counts)
  injected = counts["rate_limit"] + counts["server_error"]
  assert counts["requests"] == 36 + injected  # every fault was retried, every request answered
  assert 3 <= injected <= 20


def test_malformed_and_slow_replies():
  triple = _triples(1)[0]
  with judge_server.serve_in_thread(faults=judge_server.Faults(malformed=1.0)) as server:
    client = openai.OpenAI(base_url=server.base_url, api_key="toy", max_retries=0)
    reply = _ask(client, "annotation", "following", triple).choices[0].message.content
    with pytest.raises(ValueError):
      prompts.parse_annotation_reply(reply)
  with judge_server.serve_in_thread(
      faults=judge_server.Faults(slow=1.0, slow_seconds=1.0)
  ) as server:
    client = openai.OpenAI(base_url=server.base_url, api_key="toy", max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
      _ask(client, "annotation", "quality", triple)


def test_batch_api_round_trip():
  triples = _triples(3, seed=22)
  lines, expected = [], {}
  for i, triple in enumerate(triples):
    verdicts = judge.judge(*triple).verdicts
    for k, perspective in enumerate(prompts.PERSPECTIVES):
      custom_id = f"{i}-{perspective}"
      body = prompts.chat_request(judge_server.MODEL, "annotation", perspective, *triple)
      lines.append(
          {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
      )
      expected[custom_id] = prompts.Annotation(verdicts[k].score, verdicts[k].failure)
  broken = dict(lines[0], custom_id="broken")
  broken["body"] = {
      "model": judge_server.MODEL,
      "messages": [{"role": "user", "content": "Rate this."}],
  }
  data = "".join(json.dumps(line) + "\n" for line in lines + [broken]).encode()
  with judge_server.serve_in_thread() as server:
    client = openai.OpenAI(base_url=server.base_url, api_key="toy", max_retries=0)
    uploaded = client.files.create(file=("requests.jsonl", data), purpose="batch")
    assert uploaded.bytes == len(data) and uploaded.purpose == "batch"
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "test"},
    )
    deadline = time.time() + 30
    while batch.status not in ("completed", "failed", "cancelled") and time.time() < deadline:
      time.sleep(0.05)
      batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (10, 9, 1)
    output = [
        json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()
    ]
    errors = [
        json.loads(line) for line in client.files.content(batch.error_file_id).text.splitlines()
    ]
  got = {
      line["custom_id"]: prompts.parse_annotation_reply(
          line["response"]["body"]["choices"][0]["message"]["content"]
      )
      for line in output
  }
  assert got == expected
  assert errors[0]["custom_id"] == "broken" and errors[0]["response"]["status_code"] == 400
  assert "marker line" in errors[0]["response"]["body"]["error"]["message"]


def _post(url, data: bytes, content_type="application/json"):
  request = urllib.request.Request(
      url, data=data, headers={"Content-Type": content_type}, method="POST"
  )
  try:
    with urllib.request.urlopen(request, timeout=10) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as error:
    return error.code, json.loads(error.read())


def test_malformed_requests_get_400_with_a_message():
  instruction, original, edited = _triples(1)[0]
  good = prompts.chat_request(
      judge_server.MODEL, "evaluation", "following", instruction, original, edited
  )
  no_image = json.loads(json.dumps(good))
  no_image["messages"][1]["content"] = no_image["messages"][1]["content"][:2]
  web_image = json.loads(json.dumps(good))
  web_image["messages"][1]["content"][1]["image_url"]["url"] = "https://example.com/x.png"
  not_a_scene = np.full_like(original, 7)
  bad_scene = prompts.chat_request(
      judge_server.MODEL, "evaluation", "following", instruction, not_a_scene, edited
  )
  cases = [
      (b"{not json", "not valid JSON"),
      (json.dumps({"model": "x"}).encode(), "'messages' must be a non-empty list"),
      (json.dumps(no_image).encode(), "needs 2 image(s)"),
      (json.dumps(web_image).encode(), "base64 data URL"),
      (json.dumps(bad_scene).encode(), "original is not a clean toy scene"),
  ]
  with judge_server.serve_in_thread() as server:
    for data, message in cases:
      status, body = _post(server.base_url + "/chat/completions", data)
      assert status == 400 and message in body["error"]["message"], body
    status, body = _post(server.base_url + "/files", b"x", "text/plain")
    assert status == 400 and "multipart/form-data" in body["error"]["message"]
    status, body = _post(server.base_url + "/nowhere", b"{}")
    assert status == 404 and "unknown endpoint" in body["error"]["message"]
    client = openai.OpenAI(base_url=server.base_url, api_key="toy", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="no batch"):
      client.batches.retrieve("batch_missing")
    with pytest.raises(openai.BadRequestError, match="cannot parse instruction"):
      client.chat.completions.create(
          **prompts.chat_request(
              judge_server.MODEL, "annotation", "following", "make it pop", original, edited
          )
      )


def test_every_fault_kind_on_a_chosen_request():
  """Each kind hits the chosen request only (its first ask): transport faults raise in the openai
  client, answer faults are rejected by the parsers, benign ones parse to the judge's verdict."""
  triple = _triples(1)[0]
  verdict = judge.judge(*triple).verdicts[0]
  expected = {
      "annotation": prompts.Annotation(verdict.score, verdict.failure),
      "evaluation": prompts.Evaluation(verdict.yes, verdict.score),
  }
  parse = {
      "annotation": prompts.parse_annotation_reply,
      "evaluation": lambda text: prompts.parse_evaluation_reply("following", text),
  }
  raised = {
      "rate_limit": openai.RateLimitError,
      "server_error": openai.InternalServerError,
      "unavailable": openai.InternalServerError,
      "disconnect": openai.APIConnectionError,
      "truncated": json.JSONDecodeError,
      "slow": openai.APITimeoutError,
  }
  kind = [None]
  faults = judge_server.Faults(
      choose=lambda request: kind[0] if request.attempt == 1 else None, slow_seconds=1.5
  )
  with judge_server.serve_in_thread(faults=faults) as server:
    client = openai.OpenAI(base_url=server.base_url, api_key="toy", max_retries=0, timeout=1.0)
    last_id = None
    for kind[0] in judge_server.FAULT_KINDS:
      for form in prompts.FORMS:
        # A model name of its own makes this kind's request new to the server (attempt 1).
        ask = lambda: client.chat.completions.create(
            **prompts.chat_request(f"judge-{kind[0]}", form, "following", *triple)
        )
        if kind[0] in raised:
          with pytest.raises(raised[kind[0]]):
            ask()
        else:
          response = ask()
          assert (response.id == last_id) == (kind[0] == "duplicate_id")
          text = response.choices[0].message.content
          if kind[0] in judge_server.ANSWER_FAULTS:
            with pytest.raises(ValueError):
              parse[form](text)
          else:
            assert parse[form](text) == expected[form]
        # Asked again, the same request is answered well.
        response = ask()
        assert parse[form](response.choices[0].message.content) == expected[form]
        last_id = response.id
      assert server.counts[kind[0]] == 2
    assert server.counts["requests"] == 4 * len(judge_server.FAULT_KINDS)


def test_persistent_faults_repeat_for_the_same_request():
  triples = _triples(20, seed=23)
  with judge_server.serve_in_thread(faults=judge_server.Faults(persistent=0.25, seed=3)) as server:
    client = openai.OpenAI(base_url=server.base_url, api_key="toy", max_retries=0, timeout=2)
    outcomes = []
    for triple in triples:
      tries = []
      for _ in range(2):
        before = dict(server.counts)
        try:
          text = _ask(client, "annotation", "quality", triple).choices[0].message.content
          prompts.parse_annotation_reply(text)
          tries.append(None)
        except (openai.APIError, ValueError) as error:
          tries.append(
              next(k for k in judge_server.PERSISTENT_KINDS if server.counts[k] > before[k])
          )
          del error
      assert len(set(tries)) == 1  # the same outcome every time
      outcomes.append(tries[0])
    failing = [k for k in outcomes if k is not None]
    assert 2 <= len(failing) <= 10 and server.counts["persistent"] == 2 * len(failing)
    assert len(set(failing)) >= 2


def test_fault_rates_are_checked_and_spread():
  with pytest.raises(ValueError, match="sum to at most 1"):
    judge_server.Faults(rate_limit=0.6, truncated=0.5)
  spread = judge_server.Faults.spread(0.32)
  assert sum(spread.rates().values()) == pytest.approx(0.32)
  assert set(spread.rates().values()) == {0.32 / len(judge_server.FAULT_KINDS)}
