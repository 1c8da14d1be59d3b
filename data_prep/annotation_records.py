"""The records of reward annotation and the output file that holds them.

`make_record` builds an item's record (format: `data_prep.rewards`); `AnnotationLog` is the output
JSONL: locked, resumable (a torn last line is cut off), one record per id. `export_released` and
`import_released` convert to and from the released RewardEdit20K JSON layout.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
from typing import Optional

from data_prep import rewards
from mre import jsonl
from mre.judging import prompts
from mre.judging.client import Reply, Usage
from mre.jsonl import write_atomically

log = logging.getLogger(__name__)

PERSPECTIVES = prompts.PERSPECTIVES


def make_record(
    item_id: str,
    instruction: Optional[str],
    replies: dict[str, Reply],
    model: str,
    via: str,
    reason: Optional[str] = None,
    batch_usage: Optional[Usage] = None,
) -> dict:
  """An annotation record (see data_prep.rewards); `reason` makes it a failed one. batch_usage:
  the part of the replies' tokens billed at Batch API prices."""
  perspectives = {
      p: {"score": r.value.score, "failure": r.value.failure} for p, r in replies.items() if r.ok
  }
  usage = sum((r.usage for r in replies.values()), Usage())
  record = {
      "id": item_id,
      "status": "failed" if reason else "done",
      "instruction": instruction,
      "perspectives": {p: perspectives[p] for p in PERSPECTIVES if p in perspectives},
      "raw": {p: list(replies[p].texts) for p in PERSPECTIVES if p in replies},
      "model": model,
      "prompt_version": prompts.PROMPT_VERSION,
      "usage": usage.as_dict(),
      "via": via,
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  if batch_usage is not None and batch_usage.total_tokens:
    record["batch_usage"] = batch_usage.as_dict()
  if reason:
    record["reason"] = reason
  elif len(perspectives) != len(PERSPECTIVES):
    raise AssertionError(f"a done record needs all perspectives, got {sorted(perspectives)}")
  return record


# ---------------------------------------------------------------------------------------------
# The output file.


class AnnotationLog:
  """The output JSONL, open for appending (use as a context manager).

  Opening takes an exclusive lock on `<output>.lock` (a second run on the same output fails at
  once; the kernel drops the lock when a process dies, even by kill -9), reads the records, cuts
  off a torn last line, and refuses a file written with another model or prompt version (their
  scores are not comparable). An id written again replaces its record: on closing (or on opening,
  after a run killed before it could close) the file is compacted to one record per id.
  """

  def __init__(self, path: str, model: str, prompt_version: str = prompts.PROMPT_VERSION):
    self.path, self.model, self.prompt_version = path, model, prompt_version
    self.records: dict[str, dict] = {}  # id -> its latest record, in the order ids first came
    self._replaced = 0  # records in the file that a later record of the same id replaces
    self._handle = self._lock = None

  def __enter__(self) -> "AnnotationLog":
    directory = os.path.dirname(os.path.abspath(self.path))
    os.makedirs(directory, exist_ok=True)
    self._lock = open(self.path + ".lock", "w")
    try:
      fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._lock.close()
      raise RuntimeError(f"another annotation run is writing {self.path}") from None
    try:
      self._load()
      if self._replaced:
        log.info(
            "%s: %d record(s) replaced by later ones of the same id (a run stopped before it "
            "could compact the file); compacting it now",
            self.path,
            self._replaced,
        )
        self.compact()
      self._handle = open(self.path, "a", encoding="utf-8")
    except BaseException:
      self.__exit__(None, None, None)
      raise
    return self

  def _load(self) -> None:
    records, intact = rewards.read_records(self.path)
    for record in records:
      if (record.get("model"), record.get("prompt_version")) != (self.model, self.prompt_version):
        raise ValueError(
            f"{self.path} holds annotations by {record.get('model')!r} with prompt version "
            f"{record.get('prompt_version')!r}; this run is {self.model!r} / {self.prompt_version!r}. "
            "Scores from different judges or prompts are not comparable: write to another file."
        )
      self._keep(record)
    torn = jsonl.cut_torn_tail(self.path, intact)
    if torn:
      log.warning(
          "%s: cutting off a torn last line (%d bytes) left by an interrupted run; its item "
          "is annotated again",
          self.path,
          torn,
      )

  def _keep(self, record: dict) -> None:
    if record["id"] in self.records:
      self._replaced += 1
    self.records[record["id"]] = record

  def __exit__(self, *exc_info) -> None:
    try:
      if self._handle is not None:
        self._handle.close()
        self._handle = None
        if self._replaced:
          self.compact()
    finally:
      if self._lock is not None:
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()
        self._lock = None

  def status(self, item_id: str) -> Optional[str]:
    record = self.records.get(item_id)
    return record["status"] if record else None

  def append(self, record: dict) -> None:
    """One line, flushed and fsynced: after a crash the file holds whole records, at most
    followed by one torn line."""
    self._handle.write(_json_text(record) + "\n")
    self._handle.flush()
    os.fsync(self._handle.fileno())
    self._keep(record)

  def compact(self) -> None:
    """Rewrites the file with the latest record of each id, atomically (a kill leaves the old
    file or the new one, never a mix). Only while no append handle is open."""
    lines = [_json_text(record) + "\n" for record in self.records.values()]
    write_atomically(self.path, "".join(lines))
    log.info(
        "%s: compacted to %d records (%d replaced ones dropped)",
        self.path,
        len(lines),
        self._replaced,
    )
    self._replaced = 0

  def counts(self) -> dict[str, int]:
    statuses = [r["status"] for r in self.records.values()]
    return {"done": statuses.count("done"), "failed": statuses.count("failed")}


def _json_text(data, **options) -> str:
  """JSON as readable UTF-8. A raw reply text may hold a lone surrogate (JSON can encode one,
  UTF-8 cannot): such data is written with ASCII escapes, which read back the same."""
  text = json.dumps(data, ensure_ascii=False, **options)
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    text = json.dumps(data, **options)
  return text


# ---------------------------------------------------------------------------------------------
# The released RewardEdit20K JSON.


def export_released(annotations: str, path: str) -> dict[str, int]:
  """Writes the done records of an annotation JSONL as a released-layout JSON (atomically)."""
  records = rewards.latest_records(annotations)
  released, skipped = {}, 0
  for item_id, record in records.items():
    try:
      released[item_id] = rewards.to_released(rewards.from_record(record))
    except ValueError:
      skipped += 1
  write_json_atomically(path, released)
  return {"exported": len(released), "skipped": skipped}


def import_released(path: str, output: str, model: str = "released") -> dict[str, int]:
  """Appends the valid entries of a released-layout JSON to an annotation JSONL (model and prompt
  version "released"; ids the output holds are left alone). Bad entries are logged and counted."""
  with open(path, encoding="utf-8") as handle:
    data = json.load(handle)
  if not isinstance(data, dict):
    raise ValueError(f"{path}: a released reward file is a JSON object keyed by sample")
  counts = {"imported": 0, "already_there": 0, "bad": 0}
  with AnnotationLog(output, model, prompt_version="released") as out:
    for key, entry in data.items():
      try:
        reward = rewards.from_released(entry)
      except ValueError as error:
        log.warning("%s: skipping %r: %s", path, key, error)
        counts["bad"] += 1
        continue
      if out.status(key) == "done":
        counts["already_there"] += 1
        continue
      record = {
          "id": key,
          "status": "done",
          "instruction": None,
          "perspectives": {
              p: {"score": s, "failure": t}
              for p, s, t in zip(PERSPECTIVES, reward.scores, reward.texts)
          },
          "raw": {},
          "model": model,
          "prompt_version": "released",
          "usage": Usage().as_dict(),
          "via": "import",
          "source": os.path.basename(path),
      }
      out.append(record)
      counts["imported"] += 1
  return counts


def write_json_atomically(path: str, data) -> None:
  write_atomically(path, _json_text(data, indent=1))
