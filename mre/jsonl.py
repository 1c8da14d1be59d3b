"""JSONL files of records that runs append one line at a time and may be killed while writing.

Annotation (the annotator) and evaluation (`mre.evaluation`) both keep their results this
way: one JSON object with a string "id" per line, appended, flushed and fsynced. A run killed
mid-write leaves at most one torn line, the last one (unterminated, or cut short before its
newline). `read_records` leaves that line out and says where the intact part ends, so that a writer
can cut it off (`cut_torn_tail`) before appending: an append after a torn line would glue the next
record to it. A bad line anywhere else is not something a crash leaves, so it is an error. Blank
lines are skipped. `write_atomically` replaces a whole file (to compact it to one record per id)
so that a kill leaves the old file or the new one, never a mix.

This module needs nothing but the standard library: the library and the data scripts both
import it.
"""

from __future__ import annotations

import json
import os


def read_records(path: str, what: str = "a record") -> tuple[list[dict], int]:
  """The records of a JSONL file in file order, and the byte length of its intact part.

  A missing file has no records. An unterminated or unparsable *last* line is a write cut short:
  it is left out, and the returned length ends before it. Any other line that is not a JSON object
  with a string "id" raises ValueError naming the file, the line and `what` a line should be.
  """
  if not os.path.exists(path):
    return [], 0
  with open(path, "rb") as handle:
    data = handle.read()
  lines = data.split(b"\n")
  if not lines[-1]:  # the file ends with a newline (or is empty): no line after it
    lines.pop()
  records, intact = [], 0
  for number, line in enumerate(lines, start=1):
    is_last = number == len(lines)
    try:
      if is_last and not data.endswith(b"\n"):
        raise ValueError("no line end")
      if line.strip():
        records.append(_record(line))
    except ValueError as error:
      if is_last:
        break  # the torn tail: `intact` stays before it
      raise ValueError(f"{path}:{number}: not {what} ({error})") from None
    intact += len(line) + 1
  return records, intact


def _record(line: bytes) -> dict:
  try:
    record = json.loads(line)
  except RecursionError:  # nested too deeply for the parser: as unreadable as broken JSON
    raise ValueError("nested too deeply") from None
  if not isinstance(record, dict) or not isinstance(record.get("id"), str):
    raise ValueError("not an object with a string 'id'")
  return record


def cut_torn_tail(path: str, intact: int) -> int:
  """Cuts `path` back to its first `intact` bytes (from `read_records`), durably; returns how many
  bytes were cut (0 when nothing was torn)."""
  if not os.path.exists(path):
    return 0
  torn = os.path.getsize(path) - intact
  if torn > 0:
    with open(path, "r+b") as handle:
      handle.truncate(intact)
      os.fsync(handle.fileno())
  return max(torn, 0)


def write_atomically(path: str, text: str) -> None:
  """Replaces `path` with `text`: written and fsynced next to it, then renamed over it, and the
  rename made durable by syncing the folder."""
  temporary = path + ".tmp"
  with open(temporary, "w", encoding="utf-8") as handle:
    handle.write(text)
    handle.flush()
    os.fsync(handle.fileno())
  os.replace(temporary, path)
  folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
  try:
    os.fsync(folder)
  finally:
    os.close(folder)
