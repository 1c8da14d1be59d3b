"""Reward annotation through the Batch API: half the price, within 24 hours.

    summary = annotate_batch(items, "rewards.jsonl", judge, model="gpt-4o", batch_url=endpoint.batch_url)

One run:
  1. takes up the batches a previous run left (`<output>.batch.json`), starting any it had
     uploaded but not started;
  2. writes the requests of the items not yet annotated (three per item, custom_id
     "<perspective>:<item id>") into JSONL files of at most `max_requests` lines and `max_bytes`,
     uploads each (`files.create(purpose="batch")`) and starts a batch on it;
  3. polls until every batch has ended, downloads its output and error files and validates every
     reply: items with three valid replies are written to the output JSONL like online ones;
  4. items with an invalid or failed reply are asked again online for the perspectives that are
     missing (fallback="online"), or recorded as failed with the reason (fallback="fail").
Items of a batch that failed or expired without an answer for them are left for the next run.

The state file is replaced atomically after every change, so a run killed at any point resumes.
The batch replies of items still to be asked online are kept in it, per question, so a run killed
during the online fallback asks only the questions still missing when it is rerun (the online
answers of items in flight at the kill are asked again, as in online mode).
A batch is started once per uploaded file, unless a run dies between the API creating it and the
state being saved (one call's window): then it is started again, and as merging skips ids the
output already holds, no id is written twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Iterable, Iterator, Optional

from tqdm import tqdm

from data_prep.annotation import DEFAULT_MODEL, annotate_item, finish, pending_items, run_all, stops_cleanly
from data_prep.annotation_items import Item, load_image
from data_prep.annotation_records import PERSPECTIVES, AnnotationLog, make_record, write_json_atomically
from data_prep.annotation_summary import Summary
from mre.judging import prompts
from mre.judging.client import JudgeClient, Reply, Usage

log = logging.getLogger(__name__)

# OpenAI's limits per batch input file: 50,000 requests and 200 MB.
MAX_REQUESTS = 50_000
MAX_BYTES = 190 * 1024 * 1024
FALLBACKS = ("online", "fail")
_ENDED = ("completed", "failed", "expired", "cancelled")


@dataclasses.dataclass
class BatchRecord:
  items: dict[str, str]  # item id -> instruction (batch output lines do not echo requests)
  input_file_id: Optional[str] = None
  batch_id: Optional[str] = None
  state: str = "uploaded"  # uploaded -> submitted -> merged


class BatchState:
  """`<output>.batch.json`: the batches of an output file, and the batch replies of items still to
  be asked online (`answers`: item id -> (instruction, {perspective: Reply})), for resuming."""

  def __init__(self, path: str, model: str):
    self.path, self.model = path, model
    self.batches: list[BatchRecord] = []
    self.answers: dict[str, tuple[str, dict[str, Reply]]] = {}
    if os.path.exists(path):
      with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
      if (data.get("model"), data.get("prompt_version")) != (model, prompts.PROMPT_VERSION):
        raise ValueError(
            f"{path} belongs to a run with model {data.get('model')!r} and prompt version "
            f"{data.get('prompt_version')!r}, not {model!r} / {prompts.PROMPT_VERSION!r}"
        )
      self.batches = [BatchRecord(**b) for b in data["batches"]]
      self.answers = {
          item_id: (
              entry["instruction"],
              {p: _reply_from_json(r) for p, r in entry["replies"].items()},
          )
          for item_id, entry in data.get("answers", {}).items()
      }

  def save(self) -> None:
    answers = {
        item_id: {
            "instruction": instruction,
            "replies": {p: _reply_to_json(r) for p, r in got.items()},
        }
        for item_id, (instruction, got) in self.answers.items()
    }
    write_json_atomically(
        self.path,
        {
            "model": self.model,
            "prompt_version": prompts.PROMPT_VERSION,
            "batches": [dataclasses.asdict(b) for b in self.batches],
            "answers": answers,
        },
    )

  def open_batches(self) -> list[BatchRecord]:
    return [b for b in self.batches if b.state != "merged"]


def _reply_to_json(reply: Reply) -> dict:
  value = (
      None if reply.value is None else {"score": reply.value.score, "failure": reply.value.failure}
  )
  return {
      "value": value,
      "texts": list(reply.texts),
      "usage": reply.usage.as_dict(),
      "error": reply.error,
      "requests": reply.requests,
  }


def _reply_from_json(data: dict) -> Reply:
  value = None if data["value"] is None else prompts.Annotation(**data["value"])
  return Reply(
      value, tuple(data["texts"]), Usage.of(data["usage"]), data["error"], data["requests"]
  )


def annotate_batch(
    items: Iterable[Item],
    output: str,
    judge: JudgeClient,
    model: str = DEFAULT_MODEL,
    *,
    batch_url: str = "/v1/chat/completions",
    request_model: Optional[str] = None,
    fallback: str = "online",
    concurrency: int = 8,
    wait: bool = True,
    poll_seconds: float = 30.0,
    max_requests: int = MAX_REQUESTS,
    max_bytes: int = MAX_BYTES,
    retry_failed: bool = False,
    limit: Optional[int] = None,
    progress: bool = True,
) -> Summary:
  """Batch API annotation (see the module doc). `items` must be re-iterable: the online fallback
  reads the items it needs again. wait=False submits and returns; a later run collects.
  batch_url: Endpoint.batch_url ("/chat/completions" on Azure)."""
  if fallback not in FALLBACKS:
    raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
  if max_requests < len(PERSPECTIVES):
    raise ValueError(f"max_requests must be at least {len(PERSPECTIVES)}")
  summary = Summary(model, output)
  with AnnotationLog(output, model) as out:
    state = BatchState(output + ".batch.json", model)
    with stops_cleanly(summary, judge):
      for record in state.open_batches():
        if record.state == "uploaded":  # a run stopped between upload and batch creation
          _start(judge, state, record, batch_url)

      def unbatchable(record: dict) -> None:
        out.append(record)
        summary.add(record)

      # Batch replies an earlier run kept for the online fallback (it was stopped or killed).
      partial = {
          i: a
          for i, a in state.answers.items()
          if out.status(i) is None or (out.status(i) == "failed" and retry_failed)
      }
      covered = frozenset(i for b in state.open_batches() for i in b.items) | frozenset(partial)
      todo = pending_items(
          items, out, summary, retry_failed=retry_failed, limit=limit, exclude=covered
      )
      chunks = _chunks(
          todo, model, request_model, batch_url, max_requests, max_bytes, judge, unbatchable
      )
      for chunk, data in chunks:
        uploaded, _ = judge.call(
            judge.openai.files.create, file=("requests.jsonl", data), purpose="batch"
        )
        record = BatchRecord(chunk, input_file_id=uploaded.id)
        state.batches.append(record)
        state.save()
        _start(judge, state, record, batch_url)

      if wait:
        for record, batch in _wait_all(judge, state.open_batches(), poll_seconds, progress):
          partial.update(_merge(judge, record, batch, out, summary, model))
          # The replies of the items left for the fallback are saved with the batch's "merged"
          # mark, in one atomic write: no state of a kill loses them.
          state.answers = dict(partial)
          record.state = "merged"
          state.save()
        if partial:
          _fall_back(
              partial,
              items,
              out,
              summary,
              judge,
              model,
              request_model,
              fallback,
              concurrency,
              limit,
          )
          state.answers = {i: a for i, a in partial.items() if out.status(i) is None}
          state.save()
    summary.pending_batches = len(state.open_batches())
    summary.total_done, summary.total_failed = out.counts()["done"], out.counts()["failed"]
  return finish(summary, judge)


def custom_id(perspective: str, item_id: str) -> str:
  return f"{perspective}:{item_id}"


def _split_custom_id(value: str) -> tuple[str, str]:
  perspective, _, item_id = value.partition(":")
  if perspective not in PERSPECTIVES or not item_id:
    raise ValueError(f"unknown custom_id {value!r}")
  return perspective, item_id


def _chunks(
    todo: Iterable[Item],
    model: str,
    request_model: Optional[str],
    batch_url: str,
    max_requests: int,
    max_bytes: int,
    judge: JudgeClient,
    unbatchable,
) -> Iterator[tuple[dict[str, str], bytes]]:
  """({item id: instruction}, JSONL bytes) of batch input files within the limits. An item that
  cannot make a request (unreadable image, no instruction) goes to unbatchable(failed record)."""
  chunk, lines, size = {}, [], 0
  for item in todo:
    try:
      original, edited = load_image(item.original, "original"), load_image(item.edited, "edited")
      item_lines = [
          json.dumps(
              {
                  "custom_id": custom_id(p, item.id),
                  "method": "POST",
                  "url": batch_url,
                  "body": prompts.chat_request(
                      request_model or model, "annotation", p, item.instruction, original, edited
                  ),
              }
          )
          + "\n"
          for p in PERSPECTIVES
      ]
    except (OSError, ValueError) as error:
      unbatchable(
          make_record(
              item.id, item.instruction, {}, model, "batch", reason=judge.redact(str(error))
          )
      )
      continue
    item_size = sum(len(line.encode()) for line in item_lines)
    if chunk and (len(lines) + len(item_lines) > max_requests or size + item_size > max_bytes):
      yield chunk, "".join(lines).encode()
      chunk, lines, size = {}, [], 0
    chunk[item.id] = item.instruction
    lines.extend(item_lines)
    size += item_size
  if chunk:
    yield chunk, "".join(lines).encode()


def _start(judge: JudgeClient, state: BatchState, record: BatchRecord, batch_url: str) -> None:
  batch, _ = judge.call(
      judge.openai.batches.create,
      input_file_id=record.input_file_id,
      endpoint=batch_url,
      completion_window="24h",
      metadata={"purpose": "mre reward annotation"},
  )
  record.batch_id, record.state = batch.id, "submitted"
  state.save()
  log.info("started batch %s with %d items", batch.id, len(record.items))


def _wait_all(
    judge: JudgeClient, records: list[BatchRecord], poll_seconds: float, progress: bool
) -> Iterator[tuple[BatchRecord, object]]:
  """Yields (record, batch object) for each batch as it ends; a progress bar over requests."""
  waiting = list(records)
  total = sum(len(r.items) * len(PERSPECTIVES) for r in waiting)
  ended_requests = 0
  with tqdm(
      total=total, desc="batch requests", unit="req", disable=not progress or not total
  ) as bar:
    while waiting:
      running, running_requests = [], 0
      for record in waiting:
        batch, _ = judge.call(judge.openai.batches.retrieve, record.batch_id)
        if batch.status in _ENDED:
          ended_requests += len(record.items) * len(PERSPECTIVES)
          if batch.status != "completed":
            log.warning("batch %s ended %s: %s", batch.id, batch.status, _batch_errors(batch))
          yield record, batch
        else:
          running.append(record)
          counts = batch.request_counts
          running_requests += (counts.completed + counts.failed) if counts else 0
      waiting = running
      bar.n = ended_requests + running_requests
      bar.refresh()
      if waiting:
        time.sleep(poll_seconds)


def _batch_errors(batch) -> str:
  data = getattr(getattr(batch, "errors", None), "data", None) or []
  return (
      "; ".join(f"{getattr(e, 'code', '')}: {getattr(e, 'message', '')}" for e in data)
      or "no details"
  )


def _download(judge: JudgeClient, file_id: Optional[str]) -> list[dict]:
  if not file_id:
    return []
  content, _ = judge.call(judge.openai.files.content, file_id)
  lines = []
  for line in content.text.splitlines():
    if line.strip():
      try:
        lines.append(json.loads(line))
      except ValueError:
        log.warning("batch file %s has a line that is not JSON; ignored", file_id)
  return lines


def _merge(
    judge: JudgeClient, record: BatchRecord, batch, out: AnnotationLog, summary: Summary, model: str
) -> dict[str, tuple[str, dict[str, Reply]]]:
  """Writes the items of an ended batch whose three replies are valid. Returns {id: (instruction,
  replies)} of the items with an invalid or missing reply; items of a failed/expired batch
  without any reply are left for the next run."""
  replies: dict[str, dict[str, Reply]] = {i: {} for i in record.items}
  for line in _download(judge, batch.output_file_id) + _download(judge, batch.error_file_id):
    try:
      perspective, item_id = _split_custom_id(str(line.get("custom_id")))
    except ValueError as error:
      log.warning("batch %s: %s", batch.id, error)
      continue
    if item_id in replies:
      replies[item_id][perspective] = _line_reply(line, judge)
  partial = {}
  for item_id, got in replies.items():
    if out.status(item_id) == "done":
      continue  # merged before (a batch started twice after a crash)
    if not got and batch.status != "completed":
      summary.returned += 1
      continue
    for p in PERSPECTIVES:
      got.setdefault(p, Reply(None, error="the batch returned no answer"))
    if all(r.ok for r in got.values()):
      done = make_record(
          item_id, record.items[item_id], got, model, "batch", batch_usage=_usage(got)
      )
      out.append(done)
      summary.add(done)
    else:
      partial[item_id] = (record.items[item_id], got)
  return partial


def _usage(replies: dict[str, Reply]) -> Usage:
  return sum((r.usage for r in replies.values()), Usage())


def _line_reply(line: dict, judge: JudgeClient) -> Reply:
  response = line.get("response") or {}
  body = response.get("body") or {}
  if line.get("error") or response.get("status_code") != 200:
    error = line.get("error") or (body.get("error") if isinstance(body, dict) else None) or {}
    message = error.get("message") if isinstance(error, dict) else str(error)
    return Reply(
        None, error=judge.redact(f"batch request failed ({response.get('status_code')}): {message}")
    )
  usage = Usage.of(body.get("usage"))
  try:
    text = body["choices"][0]["message"]["content"]
  except (KeyError, IndexError, TypeError):
    return Reply(None, usage=usage, error="the batch reply has no message content", requests=1)
  if not isinstance(text, str) or not text.strip():
    return Reply(None, usage=usage, error="empty batch reply", requests=1)
  try:
    return Reply(prompts.parse_annotation_reply(text), (text,), usage, None, 1)
  except ValueError as error:
    return Reply(None, (text,), usage, f"invalid batch reply: {error}", 1)


def _fall_back(
    partial: dict[str, tuple[str, dict[str, Reply]]],
    items: Iterable[Item],
    out: AnnotationLog,
    summary: Summary,
    judge: JudgeClient,
    model: str,
    request_model: Optional[str],
    fallback: str,
    concurrency: int,
    limit: Optional[int],
) -> None:
  """Items a batch did not fully answer: asked online for the missing perspectives (the batch's
  replies, valid or not, stay in the record), or recorded as failed."""
  log.info(
      "%d item(s) without three valid batch replies: %s",
      len(partial),
      "asking them online" if fallback == "online" else "recording them as failed",
  )
  if fallback == "fail":
    for item_id, (instruction, got) in partial.items():
      problem = "; ".join(f"{p}: {r.error}" for p, r in got.items() if not r.ok)
      failed = make_record(
          item_id, instruction, got, model, "batch", reason=problem, batch_usage=_usage(got)
      )
      out.append(failed)
      summary.add(failed)
    return
  found = set()

  def wanted() -> Iterator[Item]:
    for index, item in enumerate(items):
      if (limit is not None and index >= limit) or len(found) == len(partial):
        return
      if isinstance(item, Item) and item.id in partial and item.id not in found:
        found.add(item.id)
        yield item

  work = lambda item: annotate_item(
      judge,
      item,
      model,
      request_model,
      earlier=partial[item.id][1],
      via="batch+online",
      batch_usage=_usage(partial[item.id][1]),
  )
  run_all(work, wanted(), concurrency, out, summary, judge)
  if len(found) < len(partial):
    log.warning(
        "%d item(s) to ask online are no longer in the input; a later run with them will retry",
        len(partial) - len(found),
    )
