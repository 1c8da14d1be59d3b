"""What an annotation run did: its `Summary` (counts, tokens, failures, what to do next) and the
estimated cost of the tokens used."""

from __future__ import annotations

import dataclasses
from typing import Optional

from mre.judging.client import Usage

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
  failures: list = dataclasses.field(
      default_factory=list
  )  # (id, reason) of this run's failed items
  stats: dict = dataclasses.field(default_factory=dict)  # the judge client's request counters

  def add(self, record: dict) -> None:
    if record["status"] == "done":
      self.done += 1
    else:
      self.failed += 1
      self.failures.append((record["id"], record.get("reason", "")))
    usage, batch = Usage.of(record["usage"]), Usage.of(record.get("batch_usage"))
    self.batch_usage += batch
    self.online_usage += Usage(
        usage.prompt_tokens - batch.prompt_tokens, usage.completion_tokens - batch.completion_tokens
    )

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
    cost = (
        "n/a (no price for this model)" if self.cost is None else f"~${self.cost:,.2f} (estimate)"
    )
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
      lines.append(
          f"requests {self.stats.get('requests', 0)}"
          + (", " + ", ".join(f"{k} {v}" for k, v in retries.items()) if retries else "")
      )
    for item_id, reason in self.failures[:shown]:
      lines.append(f"  failed {item_id}: {reason}")
    for bad in self.bad_input[:shown]:
      lines.append(f"  bad input {bad.where}: {bad.reason}")
    for what, listed, where in (
        ("failed items", self.failures, "their records say why"),
        ("bad input lines", self.bad_input, "listed in the log"),
    ):
      if len(listed) > shown:
        lines.append(f"  ... and {len(listed) - shown} more {what} ({where})")
    lines.append("next: " + self.next_step())
    return "\n".join(lines)

  def next_step(self) -> str:
    steps = []
    if self.stopped:
      steps.append(
          f"the run stopped early ({self.stopped}); finished items are saved in {self.output}. "
          "When the endpoint answers again (or the key / endpoint is fixed), rerun the same "
          "command to resume"
      )
    if self.pending_batches:
      steps.append(
          f"{self.pending_batches} batch(es) still running: rerun the same command to collect them"
      )
    if self.returned:
      steps.append(
          f"{self.returned} item(s) came back from failed or expired batches: "
          "rerun to submit them again"
      )
    if self.total_failed:
      steps.append(
          f"{self.total_failed} item(s) in the output failed (each record says why): "
          "rerun with --retry_failed to ask them again"
      )
    if self.bad_input:
      steps.append(
          f"fix the {len(self.bad_input)} bad input line(s) listed above (or in the log) and rerun "
          "to annotate them"
      )
    return "; ".join(steps) + "." if steps else "nothing: every input item is annotated."
