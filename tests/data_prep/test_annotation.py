"""Annotation through the real openai client against the toy judge server (and a mock Azure)."""
import collections
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
from PIL import Image

from data_prep import annotation, annotation_batch, rewards, toy_edit
from data_prep.toy import judge, judge_server
from mre.judging import prompts
from mre.judging.client import Endpoint, JudgeClient, JudgeUnavailable, RetryPolicy

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
    return annotation.TfdsItems("toy_edit/tiny", "train", toy_dir)


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
            handle.write(json.dumps({"id": item.id, "instruction": item.instruction,
                                     "original": f"{item.id}_original.png", "edited": f"{item.id}_edited.png"}) + "\n")
    return str(folder / "triplets.jsonl")


def _client(server, **options):
    return JudgeClient(openai.OpenAI(base_url=server.base_url, api_key="toy", **options), FAST, seed=0)


def _check(path, expected, ids=None):
    """Every line a done record, each id once, equal to the judge's verdicts; returns the records."""
    with open(path) as handle:
        records = [json.loads(line) for line in handle]
    counts = collections.Counter(r["id"] for r in records)
    assert max(counts.values()) == 1, [i for i, c in counts.items() if c > 1]
    assert set(counts) == set(ids if ids is not None else expected)
    for record in records:
        verdicts = expected[record["id"]].verdicts
        assert record["status"] == "done" and record["prompt_version"] == "v1"
        assert [record["perspectives"][p] for p in annotation.PERSPECTIVES] == \
            [{"score": v.score, "failure": v.failure} for v in verdicts]
        assert record["usage"]["prompt_tokens"] > 3 * 85 and record["usage"]["completion_tokens"] > 0
    return records


def test_annotation_of_a_toy_split_equals_the_judge(items, expected, tmp_path):
    output = str(tmp_path / "rewards.jsonl")
    with judge_server.serve_in_thread() as server:
        summary = annotation.annotate(items, output, _client(server), "toy-judge", concurrency=4, progress=False)
        assert server.counts["requests"] == 3 * 48
    records = _check(output, expected)
    assert all(r["model"] == "toy-judge" and r["via"] == "online" and
               all(len(r["raw"][p]) == 1 for p in annotation.PERSPECTIVES) for r in records)
    assert (summary.done, summary.failed, summary.skipped, summary.total_done) == (48, 0, 0, 48)
    assert summary.online_usage.prompt_tokens == sum(r["usage"]["prompt_tokens"] for r in records)
    assert summary.cost is None and "n/a" in summary.format()
    assert annotation.estimate_cost("gpt-4o", summary.online_usage) == pytest.approx(
        (summary.online_usage.prompt_tokens * 2.5 + summary.online_usage.completion_tokens * 10) / 1e6)
    # A rerun finds nothing to do.
    with judge_server.serve_in_thread() as server:
        again = annotation.annotate(items, output, _client(server), "toy-judge", progress=False)
        assert server.counts["requests"] == 0
    assert (again.done, again.skipped) == (0, 48)
    with pytest.raises(ValueError, match="holds annotations by 'toy-judge'"):
        annotation.annotate(items, output, _client(server), "gpt-4o", progress=False)


def test_twenty_percent_faults_lose_and_duplicate_nothing(items, expected, tmp_path):
    output = str(tmp_path / "rewards.jsonl")
    # The timeout is far above an answer's time even on a loaded machine: only slow faults time out.
    faults = judge_server.Faults(rate_limit=0.07, server_error=0.05, slow=0.02, malformed=0.06,
                                 slow_seconds=1.5, retry_after_seconds=0.001, seed=7)
    with judge_server.serve_in_thread(faults=faults) as server:
        summary = annotation.annotate(items, output, _client(server, timeout=1.0), "toy-judge", concurrency=6,
                                      limit=36, progress=False)
        counts = dict(server.counts)
    ids = [item.id for item in items][:36]
    records = _check(output, expected, ids)
    stats = summary.stats
    assert counts["rate_limit"] == stats["retry_429"] and counts["server_error"] == stats["retry_500"]
    assert counts["slow"] == stats["retry_timeout"] and counts["malformed"] == stats["reasks"]
    assert counts["requests"] == stats["requests"] == 3 * 36 + stats["retry_429"] + stats["retry_500"] + \
        stats["retry_timeout"] + stats["reasks"]
    assert 0.12 <= (counts["requests"] - 108) / counts["requests"] <= 0.3  # about 20% faults
    # A malformed reply stays in the record's raw texts, before the valid one.
    re_asked = [r for r in records if any(len(r["raw"][p]) > 1 for p in annotation.PERSPECTIVES)]
    assert len(re_asked) >= 1 and summary.done == 36


def test_killed_run_resumes_with_each_id_once(jsonl_items, expected, tmp_path):
    output = tmp_path / "rewards.jsonl"
    env = dict(os.environ, TOY_JUDGE_KEY=KEY, PYTHONPATH=REPO)
    faults = judge_server.Faults(slow=1.0, slow_seconds=0.05)  # about 0.15 s per item
    with judge_server.serve_in_thread(faults=faults) as server:
        command = [sys.executable, "-m", "data_prep.annotate", f"--jsonl={jsonl_items}", f"--output={output}",
                   f"--base_url={server.base_url}", "--model=toy-judge", "--api_key_env=TOY_JUDGE_KEY",
                   "--concurrency=2", "--noprogress", "--verbosity=1"]
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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
        finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert "cutting off a torn last line" in finished.stderr
    assert "annotated" in finished.stdout and "already done" in finished.stdout
    records = _check(output, expected)
    assert [r["id"] for r in records[:len(before)]] == before  # appended to, never rewritten
    for text in (output.read_text(), finished.stdout, finished.stderr, first_out.decode(), first_err.decode()):
        assert KEY not in text


def test_batch_mode_gives_the_same_result_and_resumes(items, expected, tmp_path):
    output = str(tmp_path / "rewards.jsonl")
    with judge_server.serve_in_thread() as server:
        # Submit only (as if the run were stopped while the batches run), then collect.
        submitted = annotation_batch.annotate_batch(items, output, _client(server), "toy-judge", limit=30,
                                                    max_requests=27, wait=False, progress=False)
        assert submitted.pending_batches == 4 and len(server.batches) == 4  # 9 items per batch
        state = json.load(open(output + ".batch.json"))
        assert [len(b["items"]) for b in state["batches"]] == [9, 9, 9, 3]
        assert all(b["state"] == "submitted" and b["batch_id"] for b in state["batches"])
        summary = annotation_batch.annotate_batch(items, output, _client(server), "toy-judge", limit=30,
                                                  max_requests=27, poll_seconds=0.02, progress=False)
        assert len(server.batches) == 4 and server.counts["requests"] == 0  # no new batch, nothing online
    records = _check(output, expected, [item.id for item in items][:30])
    assert all(r["via"] == "batch" and r["batch_usage"] == r["usage"] for r in records)
    assert all(r["instruction"] == next(i.instruction for i in items if i.id == r["id"]) for r in records)
    assert (summary.done, summary.pending_batches, summary.online_usage.total_tokens) == (30, 0, 0)
    assert all(b["state"] == "merged" for b in json.load(open(output + ".batch.json"))["batches"])
    # The rest of the split, online, into the same file: one file, each id once.
    with judge_server.serve_in_thread() as server:
        rest = annotation.annotate(items, output, _client(server), "toy-judge", progress=False)
    assert (rest.done, rest.skipped) == (18, 30)
    _check(output, expected)


@pytest.mark.parametrize("fallback", ["online", "fail"])
def test_invalid_batch_replies_are_asked_online_or_recorded_as_failed(fallback, items, expected, tmp_path,
                                                                      monkeypatch):
    chosen = list(items)[:6]
    broken = chosen[2]  # its batch quality reply is malformed (the online one is fine)
    flat = np.full_like(chosen[0].original, 200)  # not a toy scene: the judge answers 400
    unjudgeable = annotation.Item("not_a_scene", chosen[0].instruction, flat, flat)
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
        summary = annotation_batch.annotate_batch(chosen + [unjudgeable], output, _client(server), "toy-judge",
                                                  fallback=fallback, poll_seconds=0.02, progress=False)
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
        assert fixed["perspectives"]["quality"] == {"score": expected[broken.id].quality.score,
                                                    "failure": expected[broken.id].quality.failure}
        assert online_requests == 2  # one re-ask for the broken reply, one for the unjudgeable item
        assert (summary.done, summary.failed) == (6, 1)
    else:
        assert fixed["status"] == "failed" and "quality: invalid batch reply" in fixed["reason"]
        assert fixed["perspectives"]["following"]["score"] == expected[broken.id].following.score
        assert online_requests == 0 and (summary.done, summary.failed) == (5, 2)
    assert summary.batch_usage.total_tokens > 0


def test_azure_requests_go_to_the_deployment_with_the_key_header(items, expected, tmp_path, monkeypatch):
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", KEY)
    seen = []

    def azure(request):
        seen.append(request)
        reply, usage = judge_server.answer_chat(json.loads(request.content))
        return httpx2.Response(200, json=judge_server.completion_body(reply, usage, "gpt-4o"))

    endpoint = Endpoint(provider="azure", azure_endpoint="https://mre-test.openai.azure.com",
                        azure_deployment="judge-4o", api_version="2024-10-21")
    client = endpoint.create_client(http_client=httpx2.Client(transport=httpx2.MockTransport(azure)))
    judge_client = JudgeClient(client, FAST, where=endpoint.describe(), secrets=[endpoint.api_key()])
    output = str(tmp_path / "rewards.jsonl")
    annotation.annotate(items, output, judge_client, "gpt-4o", request_model=endpoint.request_model("gpt-4o"),
                        limit=4, progress=False)
    _check(output, expected, [item.id for item in items][:4])
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
            return httpx2.Response(400, json={"error": {"message": echo, "type": "invalid_request_error"}})
        reply, usage = judge_server.answer_chat(body)
        return httpx2.Response(200, json=judge_server.completion_body(reply, usage, "toy-judge"))

    client = openai.OpenAI(api_key=KEY, base_url="http://judge.test/v1",
                           http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    output = str(tmp_path / "rewards.jsonl")
    with caplog.at_level("DEBUG"):
        summary = annotation.annotate(items, output, JudgeClient(client, FAST, secrets=[KEY]), "toy-judge",
                                      limit=3, progress=False)
    records = [json.loads(line) for line in open(output)]
    assert summary.failed == 3 and all("quality: the API rejected the request (400)" in r["reason"] for r in records)
    assert all("***" in r["reason"] for r in records)
    assert KEY not in open(output).read() and KEY not in caplog.text and KEY not in summary.format()


def test_unreachable_endpoint_stops_the_run_and_says_how_to_resume(jsonl_items, tmp_path):
    output = tmp_path / "rewards.jsonl"
    items = annotation.JsonlItems(jsonl_items)
    judge_client = JudgeClient.from_endpoint(Endpoint(provider="compatible", base_url="http://127.0.0.1:9/v1"),
                                             RetryPolicy(max_attempts=2, initial_delay=0.01))
    with pytest.raises(annotation.AnnotationStopped, match="compatible http://127.0.0.1:9/v1 looks down") as stopped:
        annotation.annotate(items, str(output), judge_client, "toy-judge", progress=False)
    assert output.read_text() == "" and stopped.value.summary.failed == 0  # no item is blamed
    result = subprocess.run(
        [sys.executable, "-m", "data_prep.annotate", f"--jsonl={jsonl_items}", f"--output={output}",
         "--base_url=http://127.0.0.1:9/v1", "--max_attempts=2", "--initial_delay=0.01", "--noprogress"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: compatible http://127.0.0.1:9/v1 looks down" in result.stderr
    assert "no answer after 2 attempt(s)" in result.stderr and "connection error" in result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("next: the run stopped early") and "rerun the same command to resume" in last


def test_released_layout_export_and_import(items, expected, tmp_path):
    output = str(tmp_path / "rewards.jsonl")
    with judge_server.serve_in_thread() as server:
        annotation.annotate(items, output, _client(server), "toy-judge", limit=5, progress=False)
    with open(output, "a") as handle:  # a failed item is not exported
        handle.write(json.dumps({"id": "broken", "status": "failed", "reason": "x", "model": "toy-judge",
                                 "prompt_version": "v1", "usage": {}}) + "\n")
    released = str(tmp_path / "RewardEdit_20K.json")
    assert annotation.export_released(output, released) == {"exported": 5, "skipped": 1}
    data = json.load(open(released))
    first = next(iter(data))
    verdicts = expected[first].verdicts
    assert data[first] == [{"Score": int(v.score) if float(v.score).is_integer() else v.score,
                            "Negative Prompt": v.failure} for v in verdicts]
    data["bad_score"] = [{"Score": 7, "Negative Prompt": "x"}] * 3
    json.dump(data, open(released, "w"))
    imported = str(tmp_path / "imported.jsonl")
    assert annotation.import_released(released, imported) == {"imported": 5, "already_there": 0, "bad": 1}
    assert annotation.import_released(released, imported)["already_there"] == 5
    ours, _ = rewards.load_rewards(output)
    again, problems = rewards.load_rewards(imported)
    from_json, json_problems = rewards.load_rewards(released)
    assert ours == again == from_json and set(problems) == set() and json_problems["bad_score"].kind == "bad_score"


def test_torn_lines_only_at_the_end(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": "a", "status": "done"}\n{"id": "b", "sta')
    records, intact = rewards.read_records(str(path))
    assert [r["id"] for r in records] == ["a"] and intact == len('{"id": "a", "status": "done"}\n')
    path.write_text('{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(ValueError, match="a.jsonl:2: not an annotation record"):
        rewards.read_records(str(path))


# ---------------------------------------------------------------------------------------------
# Faults on chosen requests (issue 14): every kind ends in a done item (transient) or a failed one
# naming the perspective (persistent), and the run goes on.

TRANSIENT = judge_server.FAULT_KINDS  # each on the first ask of one question of one item
PERSISTENT = ("server_error", "unavailable", "rate_limit", "disconnect", "truncated",  # every ask
              "bool_score", "quoted_score", "nested")
BAD_LINES = [b"not json at all\n", b'{"id": 7, "instruction": "x", "original": "a.png", "edited": "b.png"}\n',
             b"[1, 2, 3]\n", b'{"id": "caf\xe9", "instruction": "x"}\n', b'{"id": "only an id"}\n']


def _fault_plan(items):
    """{edited image digest: (item, perspective, kind, persistent)} over items with distinct edits."""
    by_digest = {judge_server.image_digest(item.edited): item for item in items}
    chosen = list(by_digest.items())
    plan = {}
    for n, kind in enumerate(TRANSIENT):
        digest, item = chosen[n]
        plan[digest] = (item, annotation.PERSPECTIVES[n % 3], kind, False)
    for n, kind in enumerate(PERSISTENT):
        digest, item = chosen[len(TRANSIENT) + n]
        plan[digest] = (item, annotation.PERSPECTIVES[n % 3], kind, True)
    return plan


def _with_bad_lines(jsonl_items, folder):
    """The JSONL with its image paths made absolute and BAD_LINES spread through it; the bad lines'
    numbers."""
    root = os.path.dirname(jsonl_items)
    lines, bad = [], []
    for n, line in enumerate(open(jsonl_items)):
        entry = json.loads(line)
        entry["original"], entry["edited"] = (os.path.join(root, entry[k]) for k in ("original", "edited"))
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
        client = JudgeClient(openai.OpenAI(base_url=server.base_url, api_key="toy", timeout=1.0), policy, seed=0)
        summary = annotation.annotate(annotation.JsonlItems(path), output, client, "toy-judge", concurrency=4,
                                      progress=False)
        counts = dict(server.counts)

    records = {r["id"]: r for r in map(json.loads, open(output))}
    assert len(records) == sum(1 for _ in open(output)) == 48  # the run went on past every fault
    for item, perspective, kind, persistent in plan.values():
        record = records[item.id]
        if persistent:  # failed, naming the perspective; the perspectives before it are kept
            assert record["status"] == "failed" and record["reason"].startswith(f"{perspective}: "), (kind, record)
            reason = "no answer after 3 attempt(s)" if kind in judge_server.TRANSPORT_FAULTS else \
                "no valid reply in 3 asks"
            assert reason in record["reason"], (kind, record["reason"])
            assert perspective not in record["perspectives"]
        else:
            assert record["status"] == "done", (kind, record.get("reason"))
    done = [r for r in records.values() if r["status"] == "done"]
    _check_scores(done, expected)
    assert (summary.done, summary.failed, summary.skipped) == (40, 8, 0)
    # done + failed + skipped + bad = the input's lines; each bad line is listed with its number.
    assert summary.accounted == summary.read == 48 + len(BAD_LINES) == sum(1 for _ in open(path, "rb"))
    assert [b.where for b in summary.bad_input] == [f"{path}:{n}" for n in bad_lines]
    reasons = [b.reason for b in summary.bad_input]
    assert "not JSON" in reasons[0] and "id is a int" in reasons[1] and "got a list" in reasons[2]
    assert "not UTF-8" in reasons[3] and "missing instruction, original, edited" in reasons[4]
    # Every injected fault was seen and counted by the client.
    stats = summary.stats
    retried = {"rate_limit": "retry_429", "server_error": "retry_500", "unavailable": "retry_503",
               "disconnect": "retry_connection", "truncated": "retry_bad_body", "slow": "retry_timeout"}
    for kind, stat in retried.items():
        assert stats[stat] == counts[kind] > 0, kind
    answer_faults = sum(counts[k] for k in judge_server.ANSWER_FAULTS)
    assert stats["reasks"] == answer_faults - 3  # the three persistent answer faults' last asks end the item
    assert stats["gave_up"] == 5 and stats["requests"] == counts["requests"]
    text = summary.format()
    assert f"bad input {path}:{bad_lines[0]}: the line is not JSON" in text
    assert text.splitlines()[-1].startswith("next: 8 item(s) in the output failed") and "--retry_failed" in text
    assert "fix the 5 bad input line(s)" in text.splitlines()[-1]

    # --retry_failed asks the failed items again; the file is compacted to one record per id.
    with judge_server.serve_in_thread() as server:
        again = annotation.annotate(annotation.JsonlItems(path), output, _client(server), "toy-judge",
                                    retry_failed=True, progress=False)
        assert server.counts["requests"] == 8 * 3  # a failed item is asked all three questions again
    assert (again.done, again.failed, again.skipped, again.total_done) == (8, 0, 40, 48)
    records = _check(output, expected)
    assert all(r["via"] == "online" for r in records)
    assert again.format().splitlines()[-1] == "next: fix the 5 bad input line(s) listed above (or in the log) " \
        "and rerun to annotate them."


def _check_scores(records, expected):
    """Recorded scores are JSON numbers (never a bool or a string) and equal the judge's."""
    for record in records:
        for p, verdict in zip(annotation.PERSPECTIVES, expected[record["id"]].verdicts):
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
    with judge_server.serve_in_thread(faults=judge_server.Faults(choose=choose, retry_after_seconds=0.001)) as server:
        client = JudgeClient(openai.OpenAI(base_url=server.base_url, api_key="toy"), policy, seed=0)
        with pytest.raises(annotation.AnnotationStopped, match="looks down: requests gave up") as stopped:
            annotation.annotate(items, output, client, "toy-judge", concurrency=4, progress=False)
    summary = stopped.value.summary
    records = [json.loads(line) for line in open(output)]
    assert summary.failed == 0 and all(r["status"] == "done" for r in records) and 0 < len(records) < 48
    assert summary.format().splitlines()[-1].startswith("next: the run stopped early (")
    with judge_server.serve_in_thread() as server:
        rest = annotation.annotate(items, output, _client(server), "toy-judge", progress=False)
    assert (rest.done, rest.skipped) == (48 - len(records), len(records))
    _check(output, expected)


def test_an_output_left_with_replaced_records_is_compacted_on_open(tmp_path):
    """A run killed after writing an id again, before compacting: the next open keeps the latest."""
    path = tmp_path / "rewards.jsonl"
    common = {"model": "toy-judge", "prompt_version": prompts.PROMPT_VERSION, "usage": {}}
    lines = [dict(common, id="a", status="failed", reason="x"), dict(common, id="b", status="done"),
             dict(common, id="a", status="done")]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert rewards.latest_records(str(path))["a"]["status"] == "done"  # what every reader takes
    with annotation.AnnotationLog(str(path), "toy-judge") as out:
        assert out.counts() == {"done": 2, "failed": 0}
    assert [json.loads(line) for line in open(path)] == [lines[2], lines[1]]


def test_a_kill_during_the_batch_fallback_keeps_the_batch_answers(jsonl_items, expected, tmp_path, monkeypatch):
    """The batch answers two items only in part; the run is SIGKILLed while it asks the missing
    questions online. The rerun asks exactly those questions (1 + 2), not all three of each item."""
    chosen = list(annotation.JsonlItems(jsonl_items))[:6]
    broken = {judge_server.image_digest(annotation.load_image(chosen[1].edited, "edited")): {"quality"},
              judge_server.image_digest(annotation.load_image(chosen[4].edited, "edited")): {"preserving", "quality"}}
    answer_chat, asked = judge_server.answer_chat, collections.Counter()

    def batch_answers_spoilt(body):  # the first answer of a broken question (the batch's) is malformed
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
        command = [sys.executable, "-m", "data_prep.annotate", f"--jsonl={jsonl_items}", f"--output={output}",
                   f"--base_url={server.base_url}", "--model=toy-judge", "--batch", "--poll_seconds=0.05",
                   "--limit=6", "--concurrency=2", "--noprogress"]
        process = subprocess.Popen(command, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while server.counts["requests"] < 2 and time.time() < deadline:  # both online questions in flight
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        state = json.load(open(str(output) + ".batch.json"))
        assert {i: sorted(p for p, r in a["replies"].items() if r["value"] is None)
                for i, a in state["answers"].items()} == {chosen[1].id: ["quality"],
                                                          chosen[4].id: ["preserving", "quality"]}
        assert len(rewards.read_records(str(output))[0]) == 4  # the fully answered items
        slow[0] = False
        before = server.counts["requests"]
        finished = subprocess.run(command, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                                  text=True, timeout=60)
        assert finished.returncode == 0, finished.stderr
        assert server.counts["requests"] - before == 3 and len(server.batches) == 1
    records = {r["id"]: r for r in _check(output, expected, [item.id for item in chosen])}
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
        body = json.dumps(judge_server.completion_body(replies[-1], usage, "toy-judge"))  # "\ud800" escaped
        return httpx2.Response(200, content=body.encode(), headers={"content-type": "application/json"})

    client = openai.OpenAI(api_key=KEY, base_url="http://judge.test/v1",
                           http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    output = str(tmp_path / "rewards.jsonl")
    summary = annotation.annotate(items, output, JudgeClient(client, FAST), "toy-judge", limit=1, progress=False)
    assert summary.done == 1 and len(replies) == 4  # one re-ask
    record = _check(output, expected, [next(iter(items)).id])[0]
    assert record["raw"]["following"][0] == spoilt
