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
Batch API mode lives in `data_prep.annotation_batch`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import io
import json
import logging
import os
from typing import Any, Iterable, Iterator, Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_prep import rewards
from mre import jsonl
from mre.judging import prompts
from mre.judging.client import JudgeClient, JudgeError, Reply, Usage, run_concurrently
from mre.jsonl import write_atomically

log = logging.getLogger(__name__)

PERSPECTIVES = prompts.PERSPECTIVES
DEFAULT_MODEL = "gpt-4o"

# List prices in USD per 1M tokens (input, output) of the OpenAI API, mid-2025: an estimate only
# (Azure and later prices differ; check your provider). Image inputs are billed as input tokens,
# which the API counts into prompt_tokens. Batch API requests cost half.
PRICES_PER_MILLION = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-2024-11-20": (2.50, 10.00),
    "gpt-4o-2024-08-06": (2.50, 10.00),
    "gpt-4o-2024-05-13": (5.00, 15.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
}
BATCH_PRICE_FACTOR = 0.5


# ---------------------------------------------------------------------------------------------
# Items.

@dataclasses.dataclass(frozen=True)
class Item:
    """One triplet. Images: uint8 [H, W, 3] arrays, PIL images, encoded bytes, or file paths
    (read when the item is annotated, in a worker thread)."""

    id: str
    instruction: str
    original: Any
    edited: Any


@dataclasses.dataclass(frozen=True)
class FeatureNames:
    """Which record fields of a TFDS dataset hold what (defaults: toy_edit's features)."""

    id: Optional[str] = "id"  # None: the record's index in the split
    instruction: str = "instruction"
    original: str = "original"
    edited: str = "edited"


class TfdsItems:
    """The items of a TFDS split, read through `tfds.data_source` (random access, no TensorFlow).
    Re-iterable; records are read one at a time."""

    def __init__(self, name: str, split: str = "train", data_dir: Optional[str] = None,
                 features: FeatureNames = FeatureNames()):
        import tensorflow_datasets as tfds  # imported here: the JSONL path does not need it

        self.features = features
        self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)

    def __len__(self) -> int:
        return len(self._source)

    def __iter__(self) -> Iterator[Item]:
        f = self.features
        for index in range(len(self._source)):
            record = self._source[index]
            item_id = str(index) if f.id is None else _text(record[f.id])
            yield Item(item_id, _text(record[f.instruction]), record[f.original], record[f.edited])


@dataclasses.dataclass(frozen=True)
class BadInput:
    """An input entry that is not an item: skipped, counted and listed, never annotated."""

    where: str  # "<file>:<line number>"
    reason: str


class JsonlItems:
    """Items from a JSONL of {"id", "instruction", "original", "edited"} lines (all strings); image
    paths are relative to the JSONL's folder (or absolute). Re-iterable. A line that is not such an
    object comes as a BadInput naming its line; blank lines are ignored."""

    FIELDS = ("id", "instruction", "original", "edited")

    def __init__(self, path: str):
        self.path = path
        self._root = os.path.dirname(os.path.abspath(path))

    def __len__(self) -> int:
        with open(self.path, "rb") as handle:
            return sum(1 for line in handle if line.strip())

    def __iter__(self) -> Iterator[Item | BadInput]:
        with open(self.path, "rb") as handle:  # bytes: one line of bad UTF-8 must not end the file
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    item_id, instruction, original, edited = self._fields(line)
                except ValueError as error:
                    yield BadInput(f"{self.path}:{number}", str(error))
                    continue
                yield Item(item_id, instruction, os.path.join(self._root, original), os.path.join(self._root, edited))

    def _fields(self, line: bytes) -> list[str]:
        try:
            entry = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError("the line is not UTF-8") from None
        except RecursionError:
            raise ValueError("the line is not JSON (nested too deeply)") from None
        except ValueError as error:
            raise ValueError(f"the line is not JSON ({error})") from None
        if not isinstance(entry, dict):
            raise ValueError(f"expected an object {{\"id\", \"instruction\", \"original\", \"edited\"}}, "
                             f"got a {type(entry).__name__}")
        missing = [key for key in self.FIELDS if key not in entry]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        wrong = [f"{key} is a {type(entry[key]).__name__}" for key in self.FIELDS
                 if not isinstance(entry[key], str)]
        if wrong:
            raise ValueError(f"id, instruction, original and edited must be strings: {', '.join(wrong)}")
        if not entry["id"].strip():
            raise ValueError("the id is empty")
        return [entry[key] for key in self.FIELDS]


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_image(image, what: str) -> Any:
    """A path or encoded bytes -> uint8 RGB array (PIL decodes JPEG and PNG alike); arrays and PIL
    images pass."""
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as handle:
            image = handle.read()
    if isinstance(image, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(image)) as decoded:
                return np.asarray(decoded.convert("RGB"))
        except Exception as error:  # PIL raises many kinds for broken files
            raise ValueError(f"the {what} image is not readable ({error})") from None
    return image


# ---------------------------------------------------------------------------------------------
# One item.

def annotate_item(judge: JudgeClient, item: Item, model: str, request_model: Optional[str] = None,
                  earlier: Optional[dict[str, Reply]] = None, via: str = "online",
                  batch_usage: Optional[Usage] = None) -> dict:
    """The record of one item. Asks each perspective without a valid reply in `earlier` (replies
    of a batch: the invalid ones keep their texts and tokens in the record) and stops at the first
    that fails. JudgeError propagates."""
    replies = dict(earlier or {})
    record = lambda reason=None: make_record(item.id, item.instruction, replies, model, via, reason, batch_usage)
    try:
        original, edited = load_image(item.original, "original"), load_image(item.edited, "edited")
        for perspective in PERSPECTIVES:
            if perspective in replies and replies[perspective].ok:
                continue
            body = prompts.chat_request(request_model or model, "annotation", perspective, item.instruction,
                                        original, edited)
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
    return dataclasses.replace(later, texts=earlier.texts + later.texts, usage=earlier.usage + later.usage,
                               requests=earlier.requests + later.requests)


def make_record(item_id: str, instruction: Optional[str], replies: dict[str, Reply], model: str, via: str,
                reason: Optional[str] = None, batch_usage: Optional[Usage] = None) -> dict:
    """An annotation record (see data_prep.rewards); `reason` makes it a failed one. batch_usage:
    the part of the replies' tokens billed at Batch API prices."""
    perspectives = {p: {"score": r.value.score, "failure": r.value.failure}
                    for p, r in replies.items() if r.ok}
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
                log.info("%s: %d record(s) replaced by later ones of the same id (a run stopped before it "
                         "could compact the file); compacting it now", self.path, self._replaced)
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
                    "Scores from different judges or prompts are not comparable: write to another file.")
            self._keep(record)
        torn = jsonl.cut_torn_tail(self.path, intact)
        if torn:
            log.warning("%s: cutting off a torn last line (%d bytes) left by an interrupted run; its item "
                        "is annotated again", self.path, torn)

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
        log.info("%s: compacted to %d records (%d replaced ones dropped)", self.path, len(lines), self._replaced)
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
# Summary and cost.

def estimate_cost(model: str, online: Usage, batch: Usage = Usage()) -> Optional[float]:
    """Estimated USD for the tokens used (None for a model without a price in the table)."""
    if model not in PRICES_PER_MILLION:
        return None
    input_price, output_price = PRICES_PER_MILLION[model]
    cost = lambda u: (u.prompt_tokens * input_price + u.completion_tokens * output_price) / 1e6
    return cost(online) + BATCH_PRICE_FACTOR * cost(batch)


@dataclasses.dataclass
class Summary:
    model: str
    output: str = ""
    read: int = 0  # input entries read (within the limit)
    done: int = 0  # items this run annotated
    failed: int = 0  # items this run recorded as failed
    skipped: int = 0  # items the output already held
    duplicates: int = 0  # repeated ids in the input, annotated once
    bad_input: list = dataclasses.field(default_factory=list)  # BadInput entries skipped
    returned: int = 0  # batch mode: items of failed/expired batches, left for the next run
    online_usage: Usage = Usage()
    batch_usage: Usage = Usage()
    total_done: int = 0  # in the output after the run
    total_failed: int = 0
    pending_batches: int = 0  # batch mode: batches not finished when the run returned
    stopped: Optional[str] = None  # why the run stopped early (endpoint down, bad key)
    failures: list = dataclasses.field(default_factory=list)  # (id, reason) of this run's failed items
    stats: dict = dataclasses.field(default_factory=dict)  # the judge client's request counters

    def add(self, record: dict) -> None:
        if record["status"] == "done":
            self.done += 1
        else:
            self.failed += 1
            self.failures.append((record["id"], record.get("reason", "")))
        usage, batch = Usage.of(record["usage"]), Usage.of(record.get("batch_usage"))
        self.batch_usage += batch
        self.online_usage += Usage(usage.prompt_tokens - batch.prompt_tokens,
                                   usage.completion_tokens - batch.completion_tokens)

    @property
    def accounted(self) -> int:
        """Input entries with an outcome: done + failed + skipped + bad + repeated ids."""
        return self.done + self.failed + self.skipped + len(self.bad_input) + self.duplicates

    @property
    def cost(self) -> Optional[float]:
        return estimate_cost(self.model, self.online_usage, self.batch_usage)

    def format(self, shown: int = 5) -> str:
        """The counts, tokens and cost, the failed items and bad input lines (the first `shown` of
        each), and, last, what to do next."""
        usage = self.online_usage + self.batch_usage
        cost = "n/a (no price for this model)" if self.cost is None else f"~${self.cost:,.2f} (estimate)"
        lines = [
            f"read {self.read} input entries: annotated {self.done}, failed {self.failed}, already done "
            f"{self.skipped}, bad input lines {len(self.bad_input)}, repeated ids {self.duplicates}"
            + (f", returned by failed batches {self.returned}" if self.returned else ""),
            f"output now holds {self.total_done} done and {self.total_failed} failed items",
            f"tokens: {usage.prompt_tokens:,} prompt + {usage.completion_tokens:,} completion"
            + (f" (batch: {self.batch_usage.total_tokens:,})" if self.batch_usage.total_tokens else "")
            + f"; cost {cost}",
        ]
        retries = {k: v for k, v in sorted(self.stats.items()) if k != "requests"}
        if self.stats:
            lines.append(f"requests {self.stats.get('requests', 0)}"
                         + (", " + ", ".join(f"{k} {v}" for k, v in retries.items()) if retries else ""))
        for item_id, reason in self.failures[:shown]:
            lines.append(f"  failed {item_id}: {reason}")
        for bad in self.bad_input[:shown]:
            lines.append(f"  bad input {bad.where}: {bad.reason}")
        for what, listed, where in (("failed items", self.failures, "their records say why"),
                                    ("bad input lines", self.bad_input, "listed in the log")):
            if len(listed) > shown:
                lines.append(f"  ... and {len(listed) - shown} more {what} ({where})")
        lines.append("next: " + self.next_step())
        return "\n".join(lines)

    def next_step(self) -> str:
        steps = []
        if self.stopped:
            steps.append(f"the run stopped early ({self.stopped}); finished items are saved in {self.output}. "
                         "When the endpoint answers again (or the key / endpoint is fixed), rerun the same "
                         "command to resume")
        if self.pending_batches:
            steps.append(f"{self.pending_batches} batch(es) still running: rerun the same command to collect them")
        if self.returned:
            steps.append(f"{self.returned} item(s) came back from failed or expired batches: "
                         "rerun to submit them again")
        if self.total_failed:
            steps.append(f"{self.total_failed} item(s) in the output failed (each record says why): "
                         "rerun with --retry_failed to ask them again")
        if self.bad_input:
            steps.append(f"fix the {len(self.bad_input)} bad input line(s) listed above (or in the log) and rerun "
                         "to annotate them")
        return "; ".join(steps) + "." if steps else "nothing: every input item is annotated."


class AnnotationStopped(JudgeError):
    """The judge looks down, or the key or account is wrong: the run stopped early, its finished
    items saved. `summary` (stopped set) says what was done and what to do next."""

    def __init__(self, summary: Summary):
        super().__init__(summary.stopped)
        self.summary = summary


# ---------------------------------------------------------------------------------------------
# The online run.

def pending_items(items: Iterable[Item | BadInput], out: AnnotationLog, summary: Summary, *,
                  retry_failed: bool = False, limit: Optional[int] = None,
                  exclude: frozenset = frozenset()) -> Iterator[Item]:
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


def annotate(items: Iterable[Item | BadInput], output: str, judge: JudgeClient, model: str = DEFAULT_MODEL, *,
             request_model: Optional[str] = None, concurrency: int = 8, retry_failed: bool = False,
             limit: Optional[int] = None, progress: bool = True) -> Summary:
    """Annotates every item the output does not hold yet, `concurrency` at a time.

    request_model: the `model` sent in requests when it differs from the recorded one (an Azure
    deployment name). When the judge looks down (or the key is wrong), the finished items are
    written and AnnotationStopped is raised; rerunning resumes.
    """
    summary = Summary(model, output)
    with AnnotationLog(output, model) as out:
        total = _length(items, limit)
        with tqdm(total=total, desc="annotating", unit="item", disable=not progress, dynamic_ncols=True) as bar, \
                stops_cleanly(summary, judge):
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


def run_all(work, todo: Iterable[Item], concurrency: int, out: AnnotationLog, summary: Summary,
            judge: JudgeClient, bar=None) -> None:
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
            record = {"id": key, "status": "done", "instruction": None,
                      "perspectives": {p: {"score": s, "failure": t}
                                       for p, s, t in zip(PERSPECTIVES, reward.scores, reward.texts)},
                      "raw": {}, "model": model, "prompt_version": "released", "usage": Usage().as_dict(),
                      "via": "import", "source": os.path.basename(path)}
            out.append(record)
            counts["imported"] += 1
    return counts


def write_json_atomically(path: str, data) -> None:
    write_atomically(path, _json_text(data, indent=1))
