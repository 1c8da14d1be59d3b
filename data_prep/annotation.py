"""Reward annotation of editing triplets by a vision-language judge (GPT-4o in the paper).

    items = TfdsItems("toy_edit/tiny", "train", data_dir)       # or JsonlItems("triplets.jsonl")
    judge = JudgeClient.from_endpoint(Endpoint(base_url=...))
    summary = annotate(items, "rewards.jsonl", judge, model="gpt-4o", concurrency=16)
    print(summary.format())

Each item gets one request per perspective (`mre.judging.prompts`, annotation form); its record
(format: `data_prep.rewards`) is appended to the output JSONL as one line, flushed and fsynced, once
all three replies are valid, or as a failed record with the reason. A rerun skips every id the file
already holds, so a killed run resumes where it stopped; a torn last line is cut off and its item
redone. Each id has one record: when a run writes an id again (`retry_failed`), the file is
rewritten atomically with the latest record of each id when the run ends (or, after a kill, when
the next run opens it). Input lines that are not items are skipped, counted and listed. A run
that finds the judge down stops with AnnotationStopped, whose summary says what to do next.
Batch API mode lives in `data_prep.annotation_batch`. This module is the online run; the items
are `data_prep.annotation_items`, the records and the output file `data_prep.annotation_records`,
the run's summary and cost `data_prep.annotation_summary`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Iterable, Iterator, Optional

from tqdm import tqdm

from data_prep.annotation_items import BadInput, Item, load_image
from data_prep.annotation_records import PERSPECTIVES, AnnotationLog, make_record
from data_prep.annotation_summary import Summary
from mre.judging import prompts
from mre.judging.client import JudgeClient, JudgeError, Reply, Usage, run_concurrently

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gpt-4o"


# ---------------------------------------------------------------------------------------------
# One item.


def annotate_item(
    judge: JudgeClient,
    item: Item,
    model: str,
    request_model: Optional[str] = None,
    earlier: Optional[dict[str, Reply]] = None,
    via: str = "online",
    batch_usage: Optional[Usage] = None,
) -> dict:
  """The record of one item. Asks each perspective without a valid reply in `earlier` (replies
  of a batch: the invalid ones keep their texts and tokens in the record) and stops at the first
  that fails. JudgeError propagates."""
  replies = dict(earlier or {})
  record = lambda reason=None: make_record(
      item.id, item.instruction, replies, model, via, reason, batch_usage
  )
  try:
    original, edited = load_image(item.original, "original"), load_image(item.edited, "edited")
    for perspective in PERSPECTIVES:
      if perspective in replies and replies[perspective].ok:
        continue
      body = prompts.chat_request(
          request_model or model, "annotation", perspective, item.instruction, original, edited
      )
      reply = judge.ask(body, prompts.parse_annotation_reply)
      replies[perspective] = _merge(replies.get(perspective), reply)
      if not reply.ok:
        return record(f"{perspective}: {reply.error}")
  except (OSError, ValueError) as error:  # unreadable image, empty instruction
    return record(judge.redact(str(error)))
  return record()


def _merge(earlier: Optional[Reply], later: Reply) -> Reply:
  """`later`, carrying the texts and tokens of an earlier failed try of the same question."""
  if earlier is None:
    return later
  return dataclasses.replace(
      later,
      texts=earlier.texts + later.texts,
      usage=earlier.usage + later.usage,
      requests=earlier.requests + later.requests,
  )


class AnnotationStopped(JudgeError):
  """The judge looks down, or the key or account is wrong: the run stopped early, its finished
  items saved. `summary` (stopped set) says what was done and what to do next."""

  def __init__(self, summary: Summary):
    super().__init__(summary.stopped)
    self.summary = summary


# ---------------------------------------------------------------------------------------------
# The online run.


def pending_items(
    items: Iterable[Item | BadInput],
    out: AnnotationLog,
    summary: Summary,
    *,
    retry_failed: bool = False,
    limit: Optional[int] = None,
    exclude: frozenset = frozenset(),
) -> Iterator[Item]:
  """The items still to annotate, among the first `limit` entries of the source: not in the
  output (failed ones too unless retry_failed), not in `exclude`, each id once. Bad input
  entries are logged and listed in the summary."""
  seen = set()
  for index, item in enumerate(items):
    if limit is not None and index >= limit:
      return
    summary.read += 1
    if isinstance(item, BadInput):
      log.warning("%s: skipped: %s", item.where, item.reason)
      summary.bad_input.append(item)
      continue
    if item.id in seen:
      log.warning("the input repeats the id %r; it is annotated once", item.id)
      summary.duplicates += 1
      continue
    seen.add(item.id)
    status = out.status(item.id)
    if status == "done" or (status == "failed" and not retry_failed):
      summary.skipped += 1
      continue
    if item.id in exclude:
      continue
    yield item


def annotate(
    items: Iterable[Item | BadInput],
    output: str,
    judge: JudgeClient,
    model: str = DEFAULT_MODEL,
    *,
    request_model: Optional[str] = None,
    concurrency: int = 8,
    retry_failed: bool = False,
    limit: Optional[int] = None,
    progress: bool = True,
) -> Summary:
  """Annotates every item the output does not hold yet, `concurrency` at a time.

  request_model: the `model` sent in requests when it differs from the recorded one (an Azure
  deployment name). When the judge looks down (or the key is wrong), the finished items are
  written and AnnotationStopped is raised; rerunning resumes.
  """
  summary = Summary(model, output)
  with AnnotationLog(output, model) as out:
    total = _length(items, limit)
    with (
        tqdm(
            total=total, desc="annotating", unit="item", disable=not progress, dynamic_ncols=True
        ) as bar,
        stops_cleanly(summary, judge),
    ):
      todo = pending_items(items, out, summary, retry_failed=retry_failed, limit=limit)
      work = lambda item: annotate_item(judge, item, model, request_model)
      run_all(work, todo, concurrency, out, summary, judge, bar)
    summary.total_done, summary.total_failed = out.counts()["done"], out.counts()["failed"]
  return finish(summary, judge)


@contextlib.contextmanager
def stops_cleanly(summary: Summary, judge: JudgeClient) -> Iterator[None]:
  """Turns a run-stopping JudgeError into summary.stopped (see finish)."""
  try:
    yield
  except JudgeError as error:
    summary.stopped = judge.redact(str(error))
    log.error("stopping: %s", summary.stopped)


def finish(summary: Summary, judge: JudgeClient) -> Summary:
  """The summary with the judge's counters; AnnotationStopped if the run stopped early."""
  summary.stats = dict(judge.stats)
  if summary.stopped:
    raise AnnotationStopped(summary)
  return summary


def run_all(
    work,
    todo: Iterable[Item],
    concurrency: int,
    out: AnnotationLog,
    summary: Summary,
    judge: JudgeClient,
    bar=None,
) -> None:
  """Runs work(item) -> record concurrently and appends each record as it comes. On any error
  (JudgeError, Ctrl-C) the judge is stopped, running items are abandoned, and the error raised."""
  jobs = run_concurrently(work, todo, concurrency)
  try:
    for item, future in jobs:
      record = future.result()
      out.append(record)
      summary.add(record)
      if bar is not None:
        bar.n = summary.accounted
        bar.set_postfix(failed=summary.failed, refresh=False)
        bar.refresh()
  except BaseException:
    judge.stop()
    raise
  finally:
    with contextlib.suppress(JudgeError):
      jobs.close()


def _length(items, limit: Optional[int]) -> Optional[int]:
  try:
    n = len(items)
  except TypeError:
    return limit
  return n if limit is None else min(n, limit)
